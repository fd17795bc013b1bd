"""The saved model: one self-describing directory, and the only way anyone loads a model.

``bundle.json`` holds everything a reader (or an auditor) needs without torch: the full config,
the backbone tag and the sha256 of its weights, the template's identity and why it was chosen,
the calibrated thresholds and the dataset version. ``model.pt`` is a plain state dict (loaded
with ``weights_only=True``) whose persistent buffers carry the template features and the
feature standardization, so they can never be separated from the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tfanet_core import __version__
from tfanet_core.config import Config
from tfanet_core.model import TemplateAggregator

FORMAT_VERSION = 1
METADATA_FILE = "bundle.json"
WEIGHTS_FILE = "model.pt"


class BundleError(ValueError):
    """A bundle is missing, incomplete, or from an incompatible format version."""


@dataclass
class Bundle:
    config: Config
    model: TemplateAggregator
    backbone: dict[str, Any]
    template: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)  # {"runtime": "openvino"}: how to serve it by default

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "tfanet_version": __version__,
            "config": self.config.to_dict(),
            "model": {"in_channels": self.model.in_channels, "feature_size": self.model.feature_size},
            "backbone": self.backbone,
            "template": self.template,
            "thresholds": self.thresholds,
            "dataset": self.dataset,
            "training": self.training,
            "serving": self.serving,
        }

    def save(self, path: Path | str) -> Path:
        """Write atomically: a crash never leaves a half-written bundle where a good one was."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp / WEIGHTS_FILE)
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n")
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


def read_metadata(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise BundleError(f"{path} is not a tfanet bundle: {METADATA_FILE} is missing (train one with `tfanet train`)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {meta.get('format_version')} is not supported by this tfanet "
            f"(expects {FORMAT_VERSION}); retrain, or use the tfanet version that wrote it "
            f"({meta.get('tfanet_version')})"
        )
    return meta


def load_bundle(path: Path | str, map_location: str | torch.device = "cpu") -> Bundle:
    path = Path(path)
    meta = read_metadata(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing; the bundle is incomplete")
    config = Config.from_dict(meta["config"])
    model = TemplateAggregator(config.model, meta["model"]["in_channels"], meta["model"]["feature_size"])
    model.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True), strict=True)
    model.eval()
    return Bundle(
        config=config,
        model=model,
        backbone=meta["backbone"],
        template=meta.get("template", {}),
        thresholds=meta.get("thresholds", {}),
        dataset=meta.get("dataset", {}),
        training=meta.get("training", {}),
        serving=meta.get("serving", {}),
    )
