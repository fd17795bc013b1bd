"""Every name the chain derives from a product, in one place (MLflow, TorchServe, archives, drift runs).

Renaming a product's models means changing this module and nothing else.
"""

from __future__ import annotations

__all__ = [
    "archive_file",
    "drift_experiment_name",
    "experiment_name",
    "registered_model_name",
    "torchserve_model_name",
]

PREFIX = "tfanet"


def registered_model_name(product: str) -> str:
    """The MLflow registered model of a product (aliases ``candidate`` and ``champion`` live on it)."""
    return f"{PREFIX}-{product}"


def experiment_name(product: str) -> str:
    """The MLflow experiment that holds a product's training runs."""
    return f"{PREFIX}-{product}"


def drift_experiment_name(product: str) -> str:
    """The MLflow experiment that holds a product's drift checks (a time series, apart from training)."""
    return f"{PREFIX}-{product}-drift"


def torchserve_model_name(product: str) -> str:
    """The TorchServe model name of a product: the ``/predictions/<name>`` path clients call."""
    return f"{PREFIX}-{product}"


def archive_file(product: str, version: str) -> str:
    """The ``.mar`` file of one registered version of a product."""
    return f"{torchserve_model_name(product)}-v{version}.mar"
