"""The drift check: score a window of production images with the champion, log it, retrain the product on drift.

Each check is one MLflow run of experiment ``tfanet-<product>-drift``. A drift outside the cooldown records
the trigger on the registered model, then retrains: here with DVC (``mode: dvc``) or by submitting the
``retrain_on_drift`` pipeline through a submitter the caller passes in (``mode: kfp``). The window's images
become training normals. Decision rules and both modes: docs/architecture.md §Drift and retraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from components.naming import drift_experiment_name
from tfanet_core.config import section_from_mapping
from tfanet_core.data.images import is_image_file
from tfanet_core.drift import DriftConfig, DriftReport, Reference
from tfanet_core.errors import ConfigError, TfanetError

__all__ = [
    "LAST_RETRAIN_TAG",
    "NO_DRIFT",
    "RETRAIN_FAILED",
    "RETRAIN_TRIGGERED",
    "SUPPRESSED",
    "DriftDecision",
    "RetrainError",
    "RetrainParams",
    "RetrainRequest",
    "RetrainSubmitter",
    "Window",
    "add_images",
    "check",
    "decide",
    "list_images",
    "measure_window",
]

log = logging.getLogger(__name__)

NO_DRIFT, SUPPRESSED, RETRAIN_TRIGGERED, RETRAIN_FAILED = (
    "no_drift",
    "suppressed",
    "retrain_triggered",
    "retrain_failed",
)
LAST_RETRAIN_TAG = "drift.last_retrain_at"  # registered-model tag: ISO time of the last retrain trigger
MODES = ("dvc", "kfp")


class RetrainError(RuntimeError):
    """A retrain could not be started or failed; the message says which command and why."""


@dataclass(frozen=True)
class RetrainParams:
    """The ``retrain:`` section of params.yaml: what a detected drift may trigger, and how often."""

    cooldown_hours: float = 24.0  # no second trigger for a product within this time
    mode: str = "dvc"  # dvc: new dataset version + dvc repro here; kfp: S3 upload + retrain_on_drift pipeline
    kfp_host: str | None = None  # kfp: the KFP API endpoint (None: kfp.Client's default resolution)
    dataset_uri: str | None = None  # kfp: s3://bucket/prefix holding the dataset (MVTec layout) the pipeline reads

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"retrain.mode must be one of {MODES}, got {self.mode!r}")
        if not float(self.cooldown_hours) >= 0:
            raise ConfigError(f"retrain.cooldown_hours must be >= 0, got {self.cooldown_hours}")
        if self.dataset_uri is not None and not self.dataset_uri.startswith("s3://"):
            raise ConfigError(f"retrain.dataset_uri must be an s3:// prefix, got {self.dataset_uri!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RetrainParams:
        return section_from_mapping(cls, params, "params 'retrain'")

    @property
    def cooldown(self) -> dt.timedelta:
        return dt.timedelta(hours=float(self.cooldown_hours))


@dataclass(frozen=True)
class RetrainRequest:
    """A ``mode: kfp`` retrain to submit: the product, the whole params.yaml, the new dataset version and why."""

    product: str
    params: Mapping[str, Any]
    dataset_uri: str
    dataset_version: str
    trigger: str  # becomes the training run's ``tfanet.trigger`` tag
    host: str | None
    experiment: str
    run_name: str


#: Submits a :class:`RetrainRequest` and returns the pipeline run's id, or raises :class:`RetrainError`.
#: Passed in by the CLI layer (``pipelines.submit.submit_retrain``): a step does not know the pipelines that run it.
RetrainSubmitter = Callable[[RetrainRequest], str]


@dataclass
class DriftDecision:
    """One check: what was decided and why, the statistics behind it, and what the retrain produced."""

    product: str
    decision: str  # no_drift | suppressed | retrain_triggered | retrain_failed
    reason: str
    drift: bool
    checked_at: str
    window_source: str
    n_images: int
    champion_version: str
    drift_run_id: str | None = None
    last_retrain_at: str | None = None  # the trigger the cooldown was measured from (before this check)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrain: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def decide(
    report: DriftReport, last_trigger: dt.datetime | None, now: dt.datetime, retrain: RetrainParams
) -> tuple[str, str]:
    """(decision, reason) of a check: no drift, drift inside the cooldown, or drift that triggers a retrain."""
    if not report.drift:
        return NO_DRIFT, report.reason
    hours = f"{float(retrain.cooldown_hours):g} h"
    if last_trigger is not None and now - last_trigger < retrain.cooldown:
        return SUPPRESSED, (
            f"drift, retrain suppressed by cooldown (last at {_iso(last_trigger)}, cooldown {hours}, next allowed "
            f"after {_iso(last_trigger + retrain.cooldown)}): {report.reason}"
        )
    since = f"last at {_iso(last_trigger)}" if last_trigger is not None else "none before"
    return RETRAIN_TRIGGERED, f"drift, retraining via {retrain.mode} ({since}, cooldown {hours}): {report.reason}"


# --- the window's images ------------------------------------------------------------------------------------


def list_images(source: str | Path, workdir: Path) -> list[Path]:
    """The window: every image file under a directory, or under an ``s3://`` prefix (downloaded into ``workdir``).

    Sorted by relative path, hidden files and non-images skipped; an empty window is an error, not "no drift".
    """
    source = str(source)
    if source.startswith("s3://"):
        from components.storage import download_dir, parse_s3_uri, s3_client

        bucket, prefix = parse_s3_uri(source)
        root = workdir / "window"
        download_dir(s3_client(), bucket, prefix, root, progress=False)
    else:
        root = Path(source)
        if not root.is_dir():
            raise TfanetError(f"{root}: no such directory of window images (or pass an s3:// prefix)")
    images = sorted((p for p in root.rglob("*") if is_image_file(p)), key=lambda p: p.relative_to(root).as_posix())
    if not images:
        raise TfanetError(f"{source}: no image files in the window")
    return images


def _stamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("drift-%Y%m%dT%H%M%SZ")


def add_images(images: Sequence[Path], folder: Path, stamp: str) -> list[Path]:
    """Copy ``images`` (bytes unchanged) into ``folder`` as ``<stamp>-NNN<ext>``; never replaces an existing file."""
    targets = [folder / f"{stamp}-{i:03d}{p.suffix.lower()}" for i, p in enumerate(images)]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise FileExistsError(f"refusing to overwrite dataset files {taken[:3]}: a check with stamp {stamp} ran before")
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(images, targets, strict=True):
        shutil.copyfile(src, dst)
    return targets


# --- the retrain triggers -----------------------------------------------------------------------------------


def _dvc(project: Path, *args: str) -> str:
    exe = Path(sys.executable).with_name("dvc")
    cmd = [str(exe) if exe.is_file() else "dvc", *args]
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + proc.stderr[-2000:]).strip()
        raise RetrainError(f"`dvc {' '.join(args)}` failed ({proc.returncode}) in {project}:\n{tail}")
    return proc.stdout


def _dataset_md5(project: Path, data_root: Path) -> str | None:
    import yaml

    dvc_file = project / data_root.parent / f"{data_root.name}.dvc"
    if not dvc_file.is_file():
        return None
    return (yaml.safe_load(dvc_file.read_text()).get("outs") or [{}])[0].get("md5")


def retrain_dvc(
    product: str, images: Sequence[Path], project: Path, data_root: Path, category: str, runs: Path, stamp: str
) -> dict[str, Any]:
    """New dataset version with the window's images, pushed; then ``dvc repro register@<product>``."""
    if not (project / "dvc.yaml").is_file():
        raise RetrainError(f"{project} has no dvc.yaml: run the drift check from the DVC project root (--project)")
    old = _dataset_md5(project, data_root)
    added = add_images(images, project / data_root / category / "train" / "good", stamp)
    _dvc(project, "add", "-q", str(data_root))
    _dvc(project, "push", "-q")
    new = _dataset_md5(project, data_root)
    out = _dvc(project, "repro", f"register@{product}")
    registry_file = project / runs / product / "registry.json"
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else {}
    return {
        "mode": "dvc",
        "images_added": [str(p.relative_to(project)) for p in added],
        "dataset_md5_before": old,
        "dataset_md5": new,
        "stages": [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")],
        "registry": registry,
    }


def _s3_version(client: Any, bucket: str, prefix: str) -> str:
    """A content version of everything under ``prefix``: sha256 over the sorted (key, ETag, size) listing."""
    digest = hashlib.sha256()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    for obj in sorted((o for page in pages for o in page.get("Contents", [])), key=lambda o: o["Key"]):
        digest.update(f"{obj['Key']}\t{obj['ETag']}\t{obj['Size']}\n".encode())
    return f"s3-{digest.hexdigest()[:32]}"


def retrain_kfp(
    product: str,
    images: Sequence[Path],
    category: str,
    retrain: RetrainParams,
    stamp: str,
    params: Mapping[str, Any],
    trigger: str,
    submit: RetrainSubmitter | None,
) -> dict[str, Any]:
    """Upload the window as new objects of the dataset prefix, then submit the ``retrain_on_drift`` pipeline.

    ``params``: the whole params.yaml (the pipeline takes the product's section, the gate and the validation
    rules). The dataset version passed on is a hash of the category's object listing after the upload, so
    the pipeline's cache and the MLflow run tell the two versions apart. ``trigger`` becomes the training run's
    ``tfanet.trigger`` tag.
    """
    from components.storage import parse_s3_uri, s3_client

    if not retrain.dataset_uri:
        raise RetrainError("retrain.mode is kfp but retrain.dataset_uri is not set: name the S3 dataset prefix")
    if submit is None:
        raise RetrainError("retrain.mode is kfp but no pipeline submitter was given: run it as `tfanet drift check`")
    bucket, prefix = parse_s3_uri(retrain.dataset_uri)
    client = s3_client()
    base = f"{prefix}/{category}".strip("/")
    folder = f"{base}/train/good"
    keys = [f"{folder}/{stamp}-{i:03d}{p.suffix.lower()}" for i, p in enumerate(images)]
    if client.list_objects_v2(Bucket=bucket, Prefix=f"{folder}/{stamp}-").get("KeyCount", 0):
        raise RetrainError(f"s3://{bucket}/{folder}/{stamp}-*: already uploaded; refusing to overwrite the version")
    before = _s3_version(client, bucket, base)
    for path, key in zip(images, keys, strict=True):
        client.upload_file(str(path), bucket, key)
    version = _s3_version(client, bucket, base)
    request = RetrainRequest(
        product,
        params,
        retrain.dataset_uri,
        version,
        trigger,
        retrain.kfp_host,
        f"tfanet-{product}",
        f"{product}-retrain-{stamp}",
    )
    try:
        run_id = submit(request)
    except RetrainError as exc:  # the upload stays: name the version, so an operator can submit it by hand
        raise RetrainError(
            f"uploaded {len(keys)} images as dataset {version}, but the run was not submitted: {exc}"
        ) from exc
    return {
        "mode": "kfp",
        "images_added": [f"s3://{bucket}/{k}" for k in keys],
        "dataset_version_before": before,
        "dataset_version": version,
        "kfp_run_id": run_id,
    }


# --- MLflow -------------------------------------------------------------------------------------------------


def _metrics(report: DriftReport) -> dict[str, float]:
    metrics = {f"p_{name}": p for name, p in report.p_values.items()}
    metrics |= {"mmd2": report.mmd2, "window_size": float(report.n_window), "drift": float(report.drift)}
    if report.score is not None:
        metrics |= {"psi": report.score.psi, "ks_statistic": report.score.ks_statistic}
        if report.score.reject_rate is not None:
            metrics["reject_rate"] = report.score.reject_rate
            metrics["expected_reject_rate"] = float(report.score.expected_reject_rate or 0.0)
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def plot_window(reference: Reference, scores: np.ndarray, report: DriftReport) -> Figure:
    """The window's anomaly scores against the reference's held-out normals, and every p-value against alpha."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_scores, ax_p = fig.subplots(1, 2)
    if reference.scores is not None and len(scores):
        bins = np.histogram_bin_edges(np.concatenate([reference.scores, scores]), bins=20)
        ax_scores.hist(reference.scores, bins, density=True, alpha=0.5, label=f"reference (n={len(reference.scores)})")
        ax_scores.hist(scores, bins, density=True, alpha=0.5, label=f"window (n={len(scores)})")
        if reference.threshold is not None:
            ax_scores.axvline(reference.threshold, color="black", linestyle="--", label="image threshold")
        ax_scores.legend()
    else:
        ax_scores.text(0.5, 0.5, "no reference scores", ha="center", va="center", transform=ax_scores.transAxes)
    ax_scores.set(title="anomaly scores", xlabel="image score", ylabel="density")
    names = list(report.p_values)
    values = [max(report.p_values[n], 1e-12) for n in names]
    colours = ["tab:red" if p < report.alpha_per_test else "tab:green" for p in values]
    ax_p.bar(names, values, color=colours)
    ax_p.axhline(report.alpha_per_test, color="black", linestyle="--", label=f"alpha/{len(names)}")
    ax_p.set(yscale="log", ylim=(min([*values, report.alpha_per_test]) / 3, 1.5), title="p-values", ylabel="p")
    ax_p.legend()
    fig.suptitle(("DRIFT" if report.drift else "no drift") + f" — window of {report.n_window} images")
    return fig


def _last_trigger(client: Any, name: str) -> dt.datetime | None:
    raw = client.get_registered_model(name).tags.get(LAST_RETRAIN_TAG)
    return dt.datetime.fromisoformat(raw) if raw else None


# --- the check ------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """One window measured against the champion's drift reference."""

    reference: Reference
    images: list[Path]
    scores: np.ndarray
    report: DriftReport


def measure_window(bundle: Path, source: str | Path, workdir: Path, config: DriftConfig) -> Window:
    """Embed and score the window's images with the bundle in one backbone pass; test them against its reference."""
    from tfanet_core.drift import check_window, measure
    from tfanet_core.predictor import Predictor

    reference = Reference.load(bundle)
    images = list_images(source, workdir)
    embeddings, scores = measure(Predictor.from_bundle(bundle, device="cpu", batch_size=16), images)
    return Window(reference, images, scores, check_window(reference, embeddings, scores, config))


@contextlib.contextmanager
def _drift_run(
    product: str,
    champion: Any,
    source: str | Path,
    config: DriftConfig,
    window: Window,
    decision: str,
    reason: str,
    now: dt.datetime,
) -> Iterator[Any]:
    """The check's MLflow run: metrics stepped by the check's UNIX time (a time series), params, tags, figure."""
    import mlflow

    from components.tracking import TAG_PRODUCT

    report = window.report
    mlflow.set_experiment(drift_experiment_name(product))
    tags = {TAG_PRODUCT: product, "drift.decision": decision, "drift.reason": reason[:5000]}
    with mlflow.start_run(run_name=f"{product}-{_stamp(now)}", tags=tags) as run:
        step = int(now.timestamp())
        mlflow.log_metrics(_metrics(report), step=step, timestamp=step * 1000)
        mlflow.log_params(
            {
                "champion_version": champion.version,
                "champion_run_id": champion.run_id,
                "window_source": str(source)[:500],
                "n_images": len(window.images),
                "mmd_null": report.mmd_null,
            }
            | {f"drift.{k}": v for k, v in dataclasses.asdict(config).items()}
        )
        mlflow.log_figure(plot_window(window.reference, window.scores, report), "drift.png")
        yield run


def _retrain(
    result: DriftDecision,
    images: Sequence[Path],
    retrain: RetrainParams,
    stamp: str,
    trigger: str,
    *,
    project: Path,
    data_root: Path,
    category: str,
    runs: Path,
    params: Mapping[str, Any],
    submit: RetrainSubmitter | None,
) -> None:
    """Start the retrain ``retrain.mode`` names; a failure becomes the decision ``retrain_failed``, not a raise."""
    import mlflow

    try:
        if retrain.mode == "dvc":
            result.retrain = retrain_dvc(result.product, images, project, data_root, category, runs, stamp)
        else:
            result.retrain = retrain_kfp(result.product, images, category, retrain, stamp, params, trigger, submit)
    except (RetrainError, OSError) as exc:
        result.decision, result.reason = RETRAIN_FAILED, f"{result.reason}; retrain failed: {exc}"
        mlflow.set_tags({"drift.decision": RETRAIN_FAILED, "drift.reason": result.reason[:5000]})


def _write_record(path: Path, result: DriftDecision) -> None:
    """The decision JSON, replaced atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = path.with_name(path.name + ".tmp")
    tmp_file.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True, default=str) + "\n")
    tmp_file.replace(path)


def check(
    product: str,
    source: str | Path,
    *,
    config: DriftConfig,
    retrain: RetrainParams,
    project: Path | str = ".",
    data_root: Path | str = "data/synth",
    category: str | None = None,
    runs: Path | str = "runs",
    record: Path | str | None = None,
    params: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    now: dt.datetime | None = None,
    submit: RetrainSubmitter | None = None,
) -> DriftDecision:
    """Check one window of ``product``'s production images against its champion; retrain on drift (see module doc).

    ``project``, ``data_root`` (relative to it, as in params.yaml) and ``runs`` matter for ``mode: dvc`` only,
    ``params`` (the whole params.yaml, for the pipeline's arguments) and ``submit`` for ``mode: kfp`` only.
    ``record``: where the decision JSON goes. Raises on a missing champion, reference or window; a failed
    retrain is a decision (``retrain_failed``), logged like the others.
    """
    import mlflow
    from mlflow import MlflowClient

    from components.naming import registered_model_name
    from components.tracking import CHAMPION, download_bundle

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    now = now or dt.datetime.now(dt.UTC)
    client = MlflowClient()
    name = registered_model_name(product)
    champion = client.get_model_version_by_alias(name, CHAMPION)
    with tempfile.TemporaryDirectory(prefix=f"tfanet-drift-{product}-") as tmp:
        work = Path(tmp)
        window = measure_window(
            download_bundle(f"models:/{name}/{champion.version}", work / "model"), source, work, config
        )
        last = _last_trigger(client, name)
        decision, reason = decide(window.report, last, now, retrain)
        with _drift_run(product, champion, source, config, window, decision, reason, now) as run:
            result = DriftDecision(
                product,
                decision,
                reason,
                window.report.drift,
                _iso(now),
                str(source),
                len(window.images),
                str(champion.version),
                drift_run_id=run.info.run_id,
                last_retrain_at=_iso(last) if last else None,
                report=window.report.to_dict(),
            )
            if decision == RETRAIN_TRIGGERED:
                client.set_registered_model_tag(name, LAST_RETRAIN_TAG, _iso(now))
                _retrain(
                    result,
                    window.images,
                    retrain,
                    _stamp(now),
                    f"drift check {run.info.run_id}: {reason}",
                    project=Path(project),
                    data_root=Path(data_root),
                    category=category or product,
                    runs=Path(runs),
                    params=params or {},
                    submit=submit,
                )
            mlflow.log_dict(result.to_json(), "decision.json")
    client.set_registered_model_tag(name, "drift.last_check_at", _iso(now))
    client.set_registered_model_tag(name, "drift.last_decision", result.decision)
    log.info("%s: %s (%s)", name, result.decision, result.reason)
    if record is not None:
        _write_record(Path(record), result)
    return result
