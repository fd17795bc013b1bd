"""Served scores must equal the bundle's own scores: the checks a deploy runs before promoting.

Two gates. :func:`export_for_serving` (before anything is registered) decides the runtime: the bundle's
``serving.runtime`` where it names one, else the fastest runtime in parity on this machine. An exported
runtime's graph comes from the model version's MLflow run (exported and logged there on its first deploy,
so a user serving elsewhere takes it from the registry) and must be an unaltered export of *this* bundle
whose scores match the torch bundle's on this machine (``tfanet_core.runtimes``).
:func:`check_parity` (after registration): scores compared on the same image bytes, the reference through
``Predictor`` reading the files, the served one through HTTP, the handler's request parsing and
TorchServe's batching.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.serving.torchserve import TorchServeClient, TorchServeError
from tfanet_core.bundle import load_bundle
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import (
    FORMATS,
    PARITY_TOLERANCE,
    ExportedModel,
    ExportError,
    Parity,
    export_bundle,
    format_of,
    measure_speed,
    verify_export,
)

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


@dataclass
class ServingRuntime:
    """The runtime a version is served on and why: the bundle's serving config, or the fastest on this machine.

    ``gate`` is the chosen export's parity verdict (None on torch); ``images_per_s`` the measured speed of
    every candidate that passed its gate, at the serving batch size with the threads one worker gets;
    ``refused`` names each candidate whose export failed its gate, and why.
    """

    runtime: str
    chosen_by: str  # "bundle": its serving.runtime; "measured": the fastest candidate in parity here
    export: Path | None = None
    gate: Parity | None = None
    batch_size: int = 1
    threads: int = 1
    images_per_s: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def failure(self) -> str | None:
        """Why this version must not be served: the export its bundle asks for failed its gate."""
        return None if self.gate is None or self.gate.passed else "; ".join(self.gate.reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "chosen_by": self.chosen_by,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "images_per_s": {k: round(v, 2) for k, v in self.images_per_s.items()},
            "refused": self.refused,
        }

    def record(self) -> dict[str, Any]:
        """What a deploy decision keeps of it: the choice, and the chosen export's gate (None on torch)."""
        return {"runtime": self.to_json(), "export_parity": self.gate.to_json() if self.gate is not None else None}

    def tags(self) -> dict[str, str]:
        """The same as model-version tags: ``deploy.runtime``, and ``deploy.export_parity`` where a gate ran."""
        record = self.record()
        tags = {"deploy.runtime": json.dumps(record["runtime"])}
        if record["export_parity"] is not None:
            tags["deploy.export_parity"] = json.dumps(record["export_parity"])
        return tags


def _gated_export(
    reference: Predictor, runtime: str, run_id: str | None, work: Path, normals: torch.Tensor
) -> tuple[Path | None, Parity]:
    """``runtime``'s export of the reference bundle and the gate's verdict on it.

    The export comes from the run's ``export/<format>`` artifacts; where the run has none it is exported here
    (refused there if out of parity) and logged to the run. Either way it is checked against the bundle on the
    probe images plus a synthetic defect drawn onto each, so an export altered in the registry or made from
    another bundle is refused with a reason that names the difference.
    """
    fmt = format_of(runtime)
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
    return export, verify_export(reference, export, normals=normals)


def export_for_serving(
    bundle: Path | str,
    run_id: str | None,
    work: Path | str,
    probe_images: Sequence[Path | str],
    *,
    batch_size: int = 1,
    threads: int = 1,
) -> ServingRuntime:
    """The runtime, and export, to serve ``bundle`` with.

    The bundle's ``serving.runtime`` decides when it names one (an export failing its gate then fails the
    deploy). Without one, every exported runtime whose export passes its gate is timed against torch on the
    probe images at the serving ``batch_size`` with ``threads`` threads, and the fastest serves: which
    runtime is fastest depends on the CPU, the profile and the batch size (benchmarks/results/perf.md), so
    it is measured where it is decided rather than fixed in a default.
    """
    # The torch reference scores a serving batch in one call too, as the exports do (its default batch is 8).
    reference = Predictor(load_bundle(bundle), device="cpu", batch_size=max(1, batch_size), runtime="torch")
    size, work = reference.image_size, Path(work)
    normals = torch.stack([image_to_tensor(load_rgb(Path(p)), size) for p in probe_images])
    wanted = reference.bundle.serving.get("runtime")
    if wanted == "torch":
        return ServingRuntime("torch", "bundle")
    if wanted:
        export, gate = _gated_export(reference, wanted, run_id, work, normals)
        return ServingRuntime(wanted, "bundle", export, gate)
    exports, gates = {}, {}
    for runtime in FORMATS.values():
        export, gates[runtime] = _gated_export(reference, runtime, run_id, work, normals)
        if export is not None and gates[runtime].passed:
            exports[runtime] = export
    batch = normals[torch.arange(batch_size) % len(normals)]
    restore = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        speed = measure_speed(reference, {rt: ExportedModel(path, threads) for rt, path in exports.items()}, batch)
    finally:
        torch.set_num_threads(restore)
    best = max(speed, key=lambda runtime: speed[runtime])
    return ServingRuntime(
        best,
        "measured",
        exports.get(best),
        gates.get(best),
        batch_size,
        threads,
        speed,
        {runtime: "; ".join(gate.reasons) for runtime, gate in gates.items() if not gate.passed},
    )
