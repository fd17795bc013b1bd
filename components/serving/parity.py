"""Served scores must equal the bundle's own scores: the check a deploy runs before promoting.

Scores are compared on the same image bytes: the reference goes through ``Predictor`` reading the
files, the served one through HTTP, the handler's request parsing and TorchServe's batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from components.serving.torchserve import TorchServeClient, TorchServeError
from tfanet_core.predictor import Predictor

DEFAULT_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    model_name: str
    version: str | None
    tolerance: float
    rows: list[dict[str, object]] = field(default_factory=list)  # path, bundle score, served score, diff

    @property
    def max_abs_diff(self) -> float:
        return max((float(r["abs_diff"]) for r in self.rows), default=0.0)  # type: ignore[arg-type]

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
    reference = Predictor.from_bundle(bundle, device="cpu").predict_paths(paths)
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
