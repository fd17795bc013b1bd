"""Served scores must equal the bundle's own scores: the checks a deploy runs before promoting.

Two gates. :func:`export_for_serving` (before anything is registered): a bundle served on an exported
runtime gets its export from the model version's MLflow run (exported and logged there on its first
deploy, so a user serving elsewhere takes it from the registry) and the export must be an unaltered export
of *this* bundle whose scores match the torch bundle's on this machine (``tfanet_core.runtimes``).
:func:`check_parity` (after registration): scores compared on the same image bytes, the reference through
``Predictor`` reading the files, the served one through HTTP, the handler's request parsing and
TorchServe's batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.serving.torchserve import TorchServeClient, TorchServeError
from tfanet_core.bundle import load_bundle
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import PARITY_TOLERANCE, ExportError, Parity, export_bundle, format_of, verify_export

EXPORT_ARTIFACT = "export"  # run artifact folder: export/<format>/ (model.onnx or model.xml/.bin, export.json)

DEFAULT_TOLERANCE = 1e-4


class ParityRow(TypedDict):
    """One probe image: its score from the bundle (torch, CPU) and from the endpoint."""

    path: str
    bundle_score: float
    served_score: float
    abs_diff: float


@dataclass
class ParityReport:
    model_name: str
    version: str | None
    tolerance: float
    rows: list[ParityRow] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((float(r["abs_diff"]) for r in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and self.max_abs_diff <= self.tolerance


def check_parity(
    client: TorchServeClient,
    model_name: str,
    bundle: Path | str,
    probe_images: Sequence[Path | str],
    version: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ParityReport:
    """Score ``probe_images`` with the bundle locally and with the served ``model_name[/version]``.

    Raises :class:`TorchServeError` if the server refuses a probe image (a probe must be valid).
    """
    paths = [Path(p) for p in probe_images]
    if not paths:
        raise ValueError("check_parity needs at least one probe image")
    reference = Predictor.from_bundle(bundle, device="cpu", runtime="torch").predict_paths(paths)  # never an export
    report = ParityReport(model_name, version, tolerance)
    for path, ref in zip(paths, reference, strict=True):
        resp = client.predict(model_name, path.read_bytes(), version=version)
        if resp.status != 200:
            raise TorchServeError(resp.status, f"probe {path} refused: {resp.message}")
        served = float(resp.json()["score"])
        report.rows.append(
            {"path": str(path), "bundle_score": ref.score, "served_score": served, "abs_diff": abs(served - ref.score)}
        )
    return report


def export_for_serving(
    bundle: Path | str, run_id: str | None, work: Path | str, probe_images: Sequence[Path | str]
) -> tuple[Path | None, Parity | None]:
    """The export to serve ``bundle`` with, and the gate's verdict on it; (None, None) for the torch runtime.

    The runtime is the bundle's serving config (``serving.runtime``). The export comes from the run's
    ``export/<format>`` artifacts; where the run has none it is exported here (refused there if out of
    parity) and logged to the run. Either way it is checked against the bundle on the probe images plus a
    synthetic defect drawn onto each, so an export altered in the registry or made from another bundle is
    refused with a reason that names the difference.
    """
    reference = Predictor(load_bundle(bundle), device="cpu", runtime="torch")
    runtime = reference.bundle.serving.get("runtime", "torch")
    if runtime == "torch":
        return None, None
    fmt, work = format_of(runtime), Path(work)
    artifact = f"{EXPORT_ARTIFACT}/{fmt}"
    export: Path | None = None
    if run_id is not None:
        try:
            export = Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(work))
            )
        except (MlflowException, OSError):  # no export logged yet: the first deploy of this version makes it
            export = None
    if export is None:
        try:
            export = export_bundle(reference, fmt, work / artifact)
        except ExportError as exc:
            return None, Parity.refusal(runtime, PARITY_TOLERANCE, reference.threshold, str(exc))
        if run_id is not None:
            MlflowClient().log_artifacts(run_id, str(export), artifact)
    size = reference.image_size
    normals = torch.stack([image_to_tensor(load_rgb(Path(p)), size) for p in probe_images])
    return export, verify_export(reference, export, normals=normals)
