"""The promotion gate: the registry alias ``champion`` moves only to a candidate that is not worse.

Rule (docs/architecture.md §Promotion): every gate metric of the candidate (higher is better: AUROC, AUPRO, F1) is
at least the champion's minus ``tolerance``, **on the same dataset version** — test metrics
on different test sets say nothing about which model is better. So when the champion was
evaluated on another dataset version (new data arrived, drift retraining), the gate does not
guess: the decision is ``blocked`` unless the caller passes ``champion_metrics``, the
champion's bundle re-evaluated on the candidate's dataset version (``tfanet evaluate`` on the
bundle from :func:`components.tracking.download_bundle`). The first version of a model has
no champion to beat and is promoted. Optionally the candidate must also reproduce its
bundle's scores on a few probe images when loaded back from the registry.

Every decision — promoted, rejected or blocked — is written as ``promotion.*`` tags on the
candidate's model version, with the reason in words, so the registry shows why a model is or
is not serving.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.naming import registered_model_name
from components.tracking import (
    CANDIDATE,
    CHAMPION,
    TAG_DATASET,
    encode_images,
    flatten_metrics,
    version_by_alias,
)
from tfanet_core.config import section_from_mapping
from tfanet_core.errors import ConfigError

__all__ = ["DEFAULT_METRICS", "Comparison", "Decision", "GatePolicy", "compare", "max_score_difference", "promote"]

DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class GatePolicy:
    """Which metrics must not get worse, and by how much they may (absolute, metrics are fractions)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("the promotion gate needs at least one metric (e.g. image_auroc)")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(f"promotion tolerance must be a finite number >= 0, got {self.tolerance}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> GatePolicy:
        """From the ``promotion:`` section of params.yaml: ``{metrics: [...], tolerance: 0.005}``."""
        policy = section_from_mapping(cls, params, "params.yaml 'promotion'")
        return cls(tuple(policy.metrics), float(policy.tolerance))


@dataclass(frozen=True)
class Comparison:
    metric: str
    candidate: float | None
    champion: float | None
    passed: bool | None  # None: not compared (the champion has no value for it)


@dataclass(frozen=True)
class Decision:
    decision: str  # "promoted" | "rejected" | "blocked"
    reason: str
    name: str
    candidate_version: str
    champion_version: str | None  # the champion the candidate was compared with (before any move)
    comparisons: tuple[Comparison, ...] = ()

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def compare(
    candidate: Mapping[str, float | None], champion: Mapping[str, float | None], policy: GatePolicy
) -> list[Comparison]:
    """Metric by metric: passed when candidate >= champion - tolerance; a metric the champion lacks is skipped."""
    out = []
    for metric in policy.metrics:
        cand, champ = candidate.get(metric), champion.get(metric)
        if champ is None:
            out.append(Comparison(metric, cand, None, None))
        else:
            out.append(Comparison(metric, cand, champ, cand is not None and cand >= champ - policy.tolerance))
    return out


def _why_not(comparisons: Sequence[Comparison], tolerance: float) -> str:
    worse = [
        f"{c.metric} {'missing' if c.candidate is None else f'{c.candidate:.4f}'} < champion {c.champion:.4f}"
        f" - tolerance {tolerance:g}"
        for c in comparisons
        if c.passed is False
    ]
    return "; ".join(worse)


def max_score_difference(uri: str, images: Sequence[Path | str], bundle_dir: Path | str) -> float:
    """Largest |score| difference between the pyfunc at ``uri`` and the bundle's own Predictor on ``images``."""
    from tfanet_core.predictor import Predictor

    served = mlflow.pyfunc.load_model(uri).predict(encode_images(images))["score"].to_numpy()
    reference = [p.score for p in Predictor.from_bundle(bundle_dir).predict_paths(images)]
    return float(max(abs(a - b) for a, b in zip(served, reference, strict=True)))


def promote(
    product: str,
    version: str | int | None = None,
    *,
    policy: GatePolicy | None = None,
    champion_metrics: Mapping[str, Any] | None = None,
    probe_images: Sequence[Path | str] = (),
    bundle_dir: Path | str | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Gate ``version`` (default: alias ``candidate``) of ``tfanet-<product>``; move ``champion`` if it passes.

    ``champion_metrics``: a metrics.json (dict) of the champion re-evaluated on the candidate's
    dataset version; needed only when the champion was tested on another one. ``probe_images``
    with ``bundle_dir`` (the candidate's local bundle): the registered model must reproduce the
    bundle's scores on them (within 1e-4), or the candidate is rejected.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    policy = policy or GatePolicy()
    if probe_images and bundle_dir is None:
        raise ValueError("probe_images need bundle_dir: the local bundle whose scores the registered model must match")
    client = MlflowClient()
    name = registered_model_name(product)
    cand = _candidate(client, name, version)
    champ = version_by_alias(client, name, CHAMPION)
    if champ is not None and champ.version == cand.version:
        return Decision(
            "promoted", f"version {cand.version} already is the champion", name, cand.version, champ.version
        )
    decision, reason, comparisons = _judge(client, cand, champ, policy, champion_metrics)
    if decision == "promoted" and probe_images:
        assert bundle_dir is not None
        diff = max_score_difference(f"models:/{name}/{cand.version}", probe_images, bundle_dir)
        if diff > PROBE_TOLERANCE:
            decision = "rejected"
            reason = f"the registered model's scores differ from its bundle's by up to {diff:.3g} on the probe images"
    _record(client, name, cand.version, champ, decision, reason, policy)
    return Decision(decision, reason, name, cand.version, champ.version if champ else None, tuple(comparisons))


def _candidate(client: MlflowClient, name: str, version: str | int | None) -> ModelVersion:
    """The version to gate: ``version`` if given, else the one the alias ``candidate`` names."""
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException as exc:
        raise ValueError(
            f"no {'version ' + str(version) if version else 'candidate'} of {name}: log a run first"
        ) from exc


def _run_metrics(client: MlflowClient, version: ModelVersion) -> dict[str, float]:
    """The metrics of the run that logged ``version`` (tfanet registers every version from a run)."""
    if version.run_id is None:
        raise ValueError(f"version {version.version} of {version.name} has no run: register it with tfanet's tracking")
    return dict(client.get_run(version.run_id).data.metrics)


def _baseline(
    client: MlflowClient, cand: ModelVersion, champ: ModelVersion, champion_metrics: Mapping[str, Any] | None
) -> tuple[Mapping[str, float | None] | None, str]:
    """(the champion's metrics on the candidate's dataset version, in words where they come from), or (None, "")
    when the champion was tested on another dataset version and no re-evaluation was passed."""
    cand_dataset = cand.tags.get(TAG_DATASET)
    if champion_metrics is not None:
        return flatten_metrics(champion_metrics), f"champion v{champ.version} re-evaluated on dataset {cand_dataset}"
    if champ.tags.get(TAG_DATASET) == cand_dataset:
        basis = f"same dataset version {cand_dataset} as champion v{champ.version}"
        return _run_metrics(client, champ), basis
    return None, ""


def _judge(
    client: MlflowClient,
    cand: ModelVersion,
    champ: ModelVersion | None,
    policy: GatePolicy,
    champion_metrics: Mapping[str, Any] | None,
) -> tuple[str, str, list[Comparison]]:
    """(decision, reason, comparisons) of the metric gate, before any probe check."""
    if champ is None:
        return "promoted", "first model version: no champion yet", []
    baseline, basis = _baseline(client, cand, champ, champion_metrics)
    if baseline is None:
        reason = (
            f"champion v{champ.version} was tested on dataset {champ.tags.get(TAG_DATASET)}, candidate "
            f"v{cand.version} on {cand.tags.get(TAG_DATASET)}: their metrics are not comparable. Evaluate the "
            f"champion's bundle on {cand.tags.get(TAG_DATASET)} (tfanet evaluate) and pass its metrics.json as "
            "champion_metrics"
        )
        return "blocked", reason, []
    comparisons = compare(_run_metrics(client, cand), baseline, policy)
    if not any(c.passed is not None for c in comparisons):
        reason = f"no gate metric {list(policy.metrics)} is defined for champion v{champ.version} ({basis})"
        return "rejected", reason, comparisons
    if all(c.passed is not False for c in comparisons):
        return "promoted", f"not worse than the champion within tolerance {policy.tolerance:g} ({basis})", comparisons
    return "rejected", f"{_why_not(comparisons, policy.tolerance)} ({basis})", comparisons


def _record(
    client: MlflowClient,
    name: str,
    version: str,
    champ: ModelVersion | None,
    decision: str,
    reason: str,
    policy: GatePolicy,
) -> None:
    """Every decision as ``promotion.*`` tags on the candidate; ``champion`` moves only on a promotion."""
    tags = {
        "promotion.decision": decision,
        "promotion.reason": reason,
        "promotion.compared_with": champ.version if champ is not None else "none",
        "promotion.tolerance": f"{policy.tolerance:g}",
        "promotion.metrics": ",".join(policy.metrics),
        "promotion.decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, version)
