"""``params.yaml``, read in one place: the file, and one product's section as typed, checked settings.

Every step, CLI verb and kfp component gets a product's settings from :meth:`ProductSettings.of`, so
an unknown key is refused once, here, and ``data.category`` and the model config are derived once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfanet_core.config import Config, load_config
from tfanet_core.config import validate as validate_config
from tfanet_core.errors import ConfigError

__all__ = ["CONFIG_SECTIONS", "ProductSettings", "load_params", "product_section"]

#: Sections of a product that are model config (tfanet_core.config), laid over its ``profile``.
CONFIG_SECTIONS = ("features", "model", "train", "template", "scoring", "calibration")
_PRODUCT_KEYS = frozenset({"profile", "data", "serving", *CONFIG_SECTIONS})
_DATA_KEYS = frozenset({"category"})
DEFAULT_PROFILE = "cpu"


def load_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    """The whole params file; a missing file is a user error that says where to run from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no params file; run from the DVC project root (where dvc.yaml is)")
    return yaml.safe_load(path.read_text()) or {}


def product_section(params: Mapping[str, Any], product: str) -> dict[str, Any]:
    """The raw ``products.<product>`` mapping (what DVC tracks and MLflow logs as params)."""
    products = params.get("products") or {}
    if product not in products:
        raise ConfigError(f"product '{product}' is not in params.yaml (products: {sorted(products)}); add a section")
    return dict(products[product])


@dataclass(frozen=True)
class ProductSettings:
    """One product's settings: its dataset category, the full model config, and its serving section."""

    product: str
    category: str
    config: Config
    serving: Mapping[str, Any] = field(default_factory=dict)  # read by components.deploy.ServingParams

    @classmethod
    def of(cls, product: str, section: Mapping[str, Any]) -> ProductSettings:
        """Check a product's section (unknown keys refused, naming the known ones) and resolve its config."""
        where = f"params.yaml products.{product}"
        unknown = set(section) - _PRODUCT_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(_PRODUCT_KEYS)}")
        data = dict(section.get("data") or {})
        unknown = set(data) - _DATA_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}.data; known: {sorted(_DATA_KEYS)}")
        resolved = load_config(section.get("profile", DEFAULT_PROFILE)).to_dict()
        for name in CONFIG_SECTIONS:
            resolved[name] = {**resolved[name], **(section.get(name) or {})}
        config = Config.from_dict(resolved)
        validate_config(config)
        return cls(product, str(data.get("category", product)), config, dict(section.get("serving") or {}))
