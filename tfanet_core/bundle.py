"""The saved model: one self-describing directory that owns every file in it, and the only way anyone loads a model.

``bundle.json`` holds everything a reader (or an auditor) needs without torch: the full config,
the backbone tag and the identity of its weights, the template's identity and why it was chosen,
the calibrated thresholds (with the false-alarm rate they guarantee) and the dataset version.
``model.pt`` is a plain state dict (loaded with ``weights_only=True``) whose persistent buffers
carry the template features and the feature standardization, so they can never be separated from
the weights. ``drift_reference.npz`` (optional) is what ``tfanet drift check`` compares production
windows with. :meth:`Bundle.save` writes all of them and replaces the directory atomically, so
save → load → save keeps every file.
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
from tfanet_core.drift import REFERENCE_FILE, Reference
from tfanet_core.errors import TfanetError
from tfanet_core.model import TemplateAggregator
from tfanet_core.threshold import Threshold

#: 2: thresholds carry their FPR guarantee, the drift reference belongs to the bundle. 1 is still read.
FORMAT_VERSION = 2
METADATA_FILE = "bundle.json"
WEIGHTS_FILE = "model.pt"


class BundleError(TfanetError):
    """A bundle is missing, incomplete, or from an incompatible format version."""


@dataclass
class Bundle:
    """A trained TFA-Net with everything needed to run, judge and monitor it.

    ``thresholds`` maps ``"image"`` (and, when calibrated on maps, ``"pixel"``) to a :class:`Threshold`;
    empty until the bundle is calibrated. ``drift_reference`` is set by the chain's calibrate step.
    """

    config: Config
    model: TemplateAggregator
    backbone: dict[str, Any]
    template: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Threshold] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    drift_reference: Reference | None = None
    serving: dict[str, Any] = field(default_factory=dict)  # {"runtime": "openvino"}: how to serve it by default

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "tfanet_version": __version__,
            "config": self.config.to_dict(),
            "model": {
                "in_channels": self.model.in_channels,
                "feature_size": list(self.model.feature_size),
                "templates": self.model.templates,
                "nearest": self.model.nearest,
            },
            "backbone": self.backbone,
            "template": self.template,
            "thresholds": {level: t.to_dict() for level, t in self.thresholds.items()},
            "dataset": self.dataset,
            "training": self.training,
            "serving": self.serving,
        }

    def save(self, path: Path | str) -> Path:
        """Write every file atomically: a crash never leaves a half-written bundle where a good one was."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, tmp / WEIGHTS_FILE)
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n")
            if self.drift_reference is not None:
                self.drift_reference.save(tmp / REFERENCE_FILE)
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
    """``bundle.json`` of a bundle directory, refusing formats this tfanet cannot read."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise BundleError(f"{path} is not a tfanet bundle: {METADATA_FILE} is missing (train one with `tfanet train`)")
    meta = json.loads(meta_file.read_text())
    found = meta.get("format_version")
    if not isinstance(found, int) or found < 1:
        raise BundleError(f"{path}: {METADATA_FILE} has no valid format_version ({found!r}); the bundle is damaged")
    if found > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {found} was written by a newer tfanet ({meta.get('tfanet_version')}); this "
            f"tfanet {__version__} reads formats up to {FORMAT_VERSION}: upgrade tfanet to load it"
        )
    return meta


def load_bundle(path: Path | str, map_location: str | torch.device = "cpu") -> Bundle:
    """The bundle in directory ``path``: config, weights, thresholds, and its drift reference when it has one."""
    path = Path(path)
    meta = read_metadata(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path}: {WEIGHTS_FILE} is missing; the bundle is incomplete")
    config = Config.from_dict(meta["config"])
    shape = meta["model"]
    model = TemplateAggregator(
        config.model,
        shape["in_channels"],
        shape["feature_size"],
        templates=shape.get("templates", 1),
        nearest=shape.get("nearest", 1),
    )
    model.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True), strict=True)
    model.eval()
    return Bundle(
        config=config,
        model=model,
        backbone=meta["backbone"],
        template=meta.get("template", {}),
        thresholds={level: Threshold.from_dict(t) for level, t in (meta.get("thresholds") or {}).items()},
        dataset=meta.get("dataset", {}),
        training=meta.get("training", {}),
        drift_reference=Reference.load(path) if (path / REFERENCE_FILE).is_file() else None,
        serving=meta.get("serving", {}),
    )
