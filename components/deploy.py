"""The deploy step: TorchServe serves, as its default version of ``tfanet-<product>``, the registry's ``champion``.

:func:`deploy` compares the registry alias ``champion`` with the version TorchServe serves by
default (TorchServe versions are registry version strings). When they differ it downloads the
champion's bundle from MLflow, builds ``tfanet-<product>-v<version>.mar`` (the archive records the
registry version and run), registers it as that version next to the old one, warms it with one
request, and checks **parity**: the served scores of the probe images equal the bundle's own within
1e-4. Only then does ``set-default`` switch traffic; if parity fails the new version is unregistered
and the old default keeps serving. Either way the decision and its reason are returned, written as
JSON for the pipeline, and tagged on the model version (``deploy.status``, ``deploy.reason``,
``deploy.served_at``, ...).

**Deploy history.** The registered model's tag ``deploy.history`` lists, comma-separated and oldest
first, the versions that became TorchServe's default through this module; the last one is serving.
:func:`rollback` pops it: the previous entry becomes the default again (re-registered from the
registry if it was pruned from TorchServe) and ``champion`` moves back to it. A registry tag, not a
local file, so any machine (a DVC run, a kfp component, an operator's laptop) sees the same history.
After each switch only the last ``keep_versions`` versions of the history stay registered in
TorchServe (each registered version holds its workers' memory); older ones are unregistered.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from components.naming import registered_model_name, torchserve_model_name
from components.serving.archive import build_archive
from components.serving.parity import DEFAULT_TOLERANCE, ServingRuntime, check_parity, export_for_serving
from components.serving.torchserve import TorchServeClient, TorchServeError
from components.tracking import CANDIDATE, CHAMPION, download_bundle, version_by_alias
from tfanet_core.config import section_from_mapping
from tfanet_core.errors import ConfigError, TfanetError
from tfanet_core.runtimes import threads_per_worker

__all__ = [
    "DEPLOYED",
    "HISTORY_TAG",
    "REFUSED",
    "ROLLED_BACK",
    "UNCHANGED",
    "DeployDecision",
    "DeployError",
    "ServingParams",
    "deploy",
    "deploy_history",
    "rollback",
    "served_default",
]

HISTORY_TAG = "deploy.history"
DEPLOYED, UNCHANGED, REFUSED, ROLLED_BACK = "deployed", "unchanged", "refused", "rolled_back"


class DeployError(RuntimeError):
    """A rollback could not serve its target; the old default keeps serving and the message says why."""


@dataclass(frozen=True)
class ServingParams:
    """How TorchServe runs one product's version: the ``serving:`` section of a product in params.yaml."""

    batch_size: int = 1
    max_batch_delay_ms: int = 50
    workers: int = 1
    response_timeout_s: int = 120
    keep_versions: int = 2  # versions of the deploy history kept registered (for an instant rollback)

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "response_timeout_s", "keep_versions"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"serving.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.max_batch_delay_ms) < 0:
            raise ConfigError(f"serving.max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> ServingParams:
        serving = section_from_mapping(cls, params, "params.yaml 'serving'")
        return cls(**{k: int(v) for k, v in asdict(serving).items()})


@dataclass(frozen=True)
class DeployDecision:
    """What the deploy (or rollback) did and why; ``serving`` is TorchServe's default version afterwards."""

    product: str
    model_name: str
    status: str  # "deployed" | "unchanged" | "refused" | "rolled_back"
    reason: str
    champion: str | None  # the registry's champion afterwards
    previous_default: str | None  # TorchServe's default before the step
    serving: str | None
    parity_max_abs_diff: float | None = None
    export_parity: dict[str, Any] | None = None  # the exported runtime's gate (runtimes.Parity); None on torch
    runtime: dict[str, Any] | None = None  # what serves and why (components.serving.parity.ServingRuntime)
    archive: str | None = None
    history: tuple[str, ...] = ()
    decided_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "history": list(self.history)}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def served_default(client: TorchServeClient, name: str) -> str | None:
    """TorchServe's default version of ``name``; None when the model is not registered at all."""
    try:
        return client.default_version(name)
    except TorchServeError as exc:
        if exc.status == 404:
            return None
        raise


def _registered_versions(client: TorchServeClient, name: str) -> list[str]:
    try:
        return [str(v["modelVersion"]) for v in client.versions(name)]
    except TorchServeError as exc:
        if exc.status == 404:
            return []
        raise


def deploy_history(mlflow_client: MlflowClient, name: str) -> list[str]:
    """Versions that became TorchServe's default, oldest first (the registered model's ``deploy.history`` tag)."""
    raw = mlflow_client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in raw.split(",") if v]


def _tag(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _write(decision: DeployDecision, record: Path | str | None) -> DeployDecision:
    if record is not None:
        path = Path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(decision.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return decision


def _prune(client: TorchServeClient, name: str, history: Sequence[str], keep: int) -> None:
    """Unregister every version but the last ``keep`` of the history (the default is always the last)."""
    keep_set = set(history[-keep:])
    for version in _registered_versions(client, name):
        if version not in keep_set:
            client.unregister(name, version)


@dataclass
class _Served:
    """What :func:`_serve_version` built and measured; ``failure`` says why it is not served (None: it is)."""

    archive: Path | None
    max_abs_diff: float
    failure: str | None
    runtime: ServingRuntime

    def fields(self) -> dict[str, Any]:
        """The :class:`DeployDecision` fields that record this attempt."""
        archive = str(self.archive) if self.archive else None
        return {"parity_max_abs_diff": self.max_abs_diff, **self.runtime.record(), "archive": archive}

    def tags(self) -> dict[str, str]:
        """The model version's tags that record this attempt."""
        return {
            "deploy.parity_max_abs_diff": f"{self.max_abs_diff:.3g}",
            "deploy.archive": self.archive.name if self.archive else "none",
            "deploy.decided_at": _now(),
            **self.runtime.tags(),
        }


def _serve_version(
    client: TorchServeClient,
    mv: ModelVersion,
    product: str,
    model_store: Path,
    probes: Sequence[Path],
    serving: ServingParams,
    tolerance: float,
) -> _Served:
    """Register registry version ``mv`` in TorchServe (not yet default) on its serving runtime, warm it, check parity.

    An export that fails its gate is refused before anything is built or registered; on a served-parity
    failure the version is unregistered again, so nothing half-checked stays registered.
    """
    name = torchserve_model_name(product)
    version = str(mv.version)
    if version in _registered_versions(client, name):
        client.unregister(name, version)  # a leftover of an interrupted deploy: rebuild it from the registry
    with tempfile.TemporaryDirectory(prefix=f"{name}-v{version}-") as tmp:
        bundle = download_bundle(f"models:/{mv.name}/{version}", Path(tmp) / "model")
        runtime = export_for_serving(
            bundle,
            mv.run_id,
            Path(tmp) / "export",
            probes,
            batch_size=serving.batch_size,
            threads=threads_per_worker(serving.workers),
        )
        if runtime.failure is not None:
            return _Served(None, math.nan, f"export gate failed for v{version}: {runtime.failure}", runtime)
        mar = build_archive(
            bundle,
            product,
            version,
            model_store,
            source={"kind": "mlflow", "model": mv.name, "version": version, "run_id": mv.run_id},
            filename=f"{name}-v{version}.mar",
            export=runtime.export,
            workers=serving.workers,
        )
        client.register(
            mar.name,
            name,
            batch_size=serving.batch_size,
            max_batch_delay_ms=serving.max_batch_delay_ms,
            initial_workers=serving.workers,
            response_timeout_s=serving.response_timeout_s,
        )
        try:
            warm = client.predict(name, probes[0].read_bytes(), version=version)
            if warm.status != 200:
                raise TorchServeError(warm.status, f"warm-up request refused: {warm.message}")
            report = check_parity(client, name, bundle, probes, version=version, tolerance=tolerance)
        except BaseException:
            client.unregister(name, version)
            raise
    if report.passed:
        return _Served(mar, report.max_abs_diff, None, runtime)
    # Not the default (set-default comes only after parity), unless it is the product's first version,
    # which TorchServe serves from registration on: then, as before the step, nothing is served.
    client.unregister(name, version)
    worst = max(report.rows, key=lambda r: float(r["abs_diff"]))
    return _Served(
        mar,
        report.max_abs_diff,
        f"parity failed: served scores of v{version} differ from its bundle's by up to {report.max_abs_diff:.3g} "
        f"(> {tolerance:g}; worst probe {worst['path']}); check the archive and the server's torch build",
        runtime,
    )


def _check(probes: Sequence[Path | str], tolerance: float) -> list[Path]:
    paths = [Path(p) for p in probes]
    if not paths:
        raise TfanetError("deploy needs at least one probe image (a normal and a defective test image are best)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TfanetError(f"probe image(s) not found: {missing}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"parity tolerance must be a finite number >= 0, got {tolerance}")
    return paths


def deploy(
    product: str,
    client: TorchServeClient,
    model_store: Path | str,
    probes: Sequence[Path | str],
    *,
    serving: ServingParams | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    tracking_uri: str | None = None,
    record: Path | str | None = None,
) -> DeployDecision:
    """Make TorchServe's default version of ``tfanet-<product>`` the registry's ``champion``, if it passes parity.

    ``model_store`` is the server's model store (``<state dir>/model_store``), where the archive is
    written. ``record``: where to write the decision as JSON (the DVC stage's output).
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    paths = _check(probes, tolerance)
    serving = serving or ServingParams()
    name = torchserve_model_name(product)
    registry = MlflowClient()
    reg_name = registered_model_name(product)
    champion = version_by_alias(registry, reg_name, CHAMPION)
    previous = served_default(client, name)
    history = deploy_history(registry, reg_name) if champion is not None else []

    def decide(status: str, reason: str, serving_now: str | None, **extra: Any) -> DeployDecision:
        return _write(
            DeployDecision(
                product,
                name,
                status,
                reason,
                champion.version if champion else None,
                previous,
                serving_now,
                history=tuple(history),
                decided_at=_now(),
                **extra,
            ),
            record,
        )

    if champion is None:
        where = f"v{previous} keeps serving" if previous else "nothing is served"
        return decide(
            UNCHANGED, f"{reg_name} has no champion yet (register and promote a version first); {where}", previous
        )
    version = str(champion.version)
    if previous == version:
        reason = f"champion v{version} already is the served default"
        candidate = version_by_alias(registry, reg_name, CANDIDATE)
        if candidate is not None and candidate.version != version:
            why = candidate.tags.get("promotion.reason", "not gated yet")
            state = candidate.tags.get("promotion.decision", "not gated")
            reason += f"; candidate v{candidate.version} was {state} by the promotion gate: {why}"
            _tag(registry, reg_name, candidate.version, {"deploy.status": "not_deployed", "deploy.reason": reason})
        return decide(UNCHANGED, reason, previous)

    served = _serve_version(client, champion, product, Path(model_store), paths, serving, tolerance)
    tags = served.tags()
    if served.failure is not None:
        reason = f"{served.failure}; " + (f"v{previous} keeps serving" if previous else "nothing is served")
        _tag(registry, reg_name, version, {**tags, "deploy.status": REFUSED, "deploy.reason": reason})
        return decide(REFUSED, reason, served_default(client, name), **served.fields())
    client.set_default(name, version)
    history.append(version)
    registry.set_registered_model_tag(reg_name, HISTORY_TAG, ",".join(history))
    _prune(client, name, history, serving.keep_versions)
    reason = (
        f"champion v{version} on {served.runtime.runtime} passed parity "
        f"(max |diff| {served.max_abs_diff:.2g} <= {tolerance:g}) and replaced "
    ) + (f"v{previous}" if previous else "nothing (first version served)")
    _tag(
        registry,
        reg_name,
        version,
        {**tags, "deploy.status": DEPLOYED, "deploy.reason": reason, "deploy.served_at": _now()},
    )
    return decide(DEPLOYED, reason, version, **served.fields())


def rollback(
    product: str,
    client: TorchServeClient,
    model_store: Path | str,
    probes: Sequence[Path | str],
    *,
    serving: ServingParams | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    tracking_uri: str | None = None,
    record: Path | str | None = None,
) -> DeployDecision:
    """Serve the previous entry of the deploy history again and move ``champion`` back to it.

    The rolled-back version leaves the history, so a following :func:`deploy` sees champion =
    default and changes nothing; a new, better candidate must pass the gate to replace it.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    paths = _check(probes, tolerance)
    serving = serving or ServingParams()
    name = torchserve_model_name(product)
    registry = MlflowClient()
    reg_name = registered_model_name(product)
    history = deploy_history(registry, reg_name)
    if len(history) < 2:
        raise TfanetError(
            f"{reg_name} has no earlier deployed version to roll back to (deploy history: {history or 'empty'})"
        )
    current, target = history[-1], history[-2]
    previous = served_default(client, name)
    served: _Served | None = None
    if target not in _registered_versions(client, name):
        served = _serve_version(
            client, registry.get_model_version(reg_name, target), product, Path(model_store), paths, serving, tolerance
        )
        if served.failure is not None:
            raise DeployError(f"rollback to v{target} aborted, v{previous} keeps serving: {served.failure}")
    client.set_default(name, target)
    registry.set_registered_model_alias(reg_name, CHAMPION, target)
    history = history[:-1]
    registry.set_registered_model_tag(reg_name, HISTORY_TAG, ",".join(history))
    _prune(client, name, history, serving.keep_versions)
    now = _now()
    reason = f"rolled back from v{current} to v{target}; champion moved back to v{target}"
    _tag(registry, reg_name, current, {"deploy.status": ROLLED_BACK, "deploy.reason": reason, "deploy.decided_at": now})
    _tag(registry, reg_name, target, {"deploy.status": DEPLOYED, "deploy.reason": reason, "deploy.served_at": now})
    return _write(
        DeployDecision(
            product,
            name,
            ROLLED_BACK,
            reason,
            target,
            previous,
            target,
            **(served.fields() if served else {}),
            history=tuple(history),
            decided_at=now,
        ),
        record,
    )
