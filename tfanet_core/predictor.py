"""Inference from a bundle: the one code path behind the CLI, evaluation, MLflow and TorchServe.

Batched, ``torch.inference_mode``, the template's tokens computed once per loaded bundle, and
the backbone checked against the exact weights the bundle was trained on. On CUDA the
transformer runs under bf16 autocast; on the CPU in fp32, the backbone in channels-last memory
format (oneDNN's faster convolutions, same scores). ``int8=True`` quantizes the transformer's
linear layers dynamically (int8 weights and activations, fp32 accumulation): faster on the CPU
but it moves scores, so it is opt-in; the speed-ups and score differences measured on this
machine are in ``benchmarks/results/perf.md``. ``runtime="onnxruntime" | "openvino"`` runs images through
the bundle's exported graph instead (``tfanet_core.runtimes``: exported on first use, refused out of parity).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tfanet_core.bundle import Bundle, BundleError, load_bundle
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.errors import ConfigError
from tfanet_core.features import FeatureExtractor
from tfanet_core.model import TemplateAggregator
from tfanet_core.runtimes import RUNTIMES, ExportedModel, load_or_export
from tfanet_core.scoring import anomaly_map, image_score
from tfanet_core.threshold import Threshold

# The tolerances the product relies on, beside the code they bound (the benchmark checks them on every run):
# the default fast path (batched, inference_mode, cached template tokens, channels-last backbone) is fp32 maths
# in another order, so its scores may differ from the plain path's by rounding only (max relative difference).
FAST_PATH_TOLERANCE = 1e-4
# int8 dynamic quantization is opt-in (``int8=True``, `tfanet predict --int8`): accepted where its scores stay
# within this relative tolerance *and* the image AUROC moves by at most INT8_AUROC_TOLERANCE.
INT8_TOLERANCE = 0.05
INT8_AUROC_TOLERANCE = 0.01

#: What scoring a batch yields: image scores [N], anomaly maps [N, H, W], template-bank indices used [N, nearest].
Scored = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Prediction:
    """One image's verdict: its score, and the threshold it was judged by (None on an uncalibrated bundle).

    With ``return_maps``: the anomaly map at the model's input size and, where the bundle has a pixel
    threshold, ``pred_mask`` (map > pixel threshold), the defect region to show an operator.
    """

    score: float
    threshold: float | None
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None = None  # [H, W] float32 at the model's input size
    pred_mask: np.ndarray | None = None  # [H, W] bool
    templates: list[str] | None = None  # training images it was aggregated onto (the template or bank entries)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    def __init__(
        self,
        bundle: Bundle,
        device: torch.device | str | None = None,
        batch_size: int = 8,
        extractor: FeatureExtractor | None = None,
        int8: bool = False,
        runtime: str | None = None,
        export_dir: Path | str | None = None,
    ) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        self.extractor = extractor or FeatureExtractor(self.config.features)
        expected = bundle.backbone.get("sha256")
        # Bundles of format 1 recorded the weight file's hash; since format 2 the identity is the tensors' hash.
        if expected and expected not in (self.extractor.weight_sha256, self.extractor.file_sha256):
            raise BundleError(
                f"backbone weights differ from the ones this bundle was trained on: {bundle.backbone.get('tag')} "
                f"sha256 {self.extractor.weight_sha256[:12]}… here, {expected[:12]}… in the bundle"
            )
        self.extractor.to(self.device)
        self.model = bundle.model.to(self.device).eval()
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.extractor.to(memory_format=self.memory_format)
        if int8:
            if self.device.type != "cpu":
                raise ValueError("int8 dynamic quantization runs on the CPU only; on a GPU the bf16 path is faster")
            self.model = quantize_linear_int8(self.model)
        self.runtime: str = "torch"
        self.exported: ExportedModel | None = None  # the torch path first: an export is checked against it
        self.runtime, self.exported = self._runtime(runtime, export_dir, int8)

    @property
    def image_threshold(self) -> Threshold | None:
        """The bundle's image threshold, read live: calibrating the bundle calibrates its predictor too."""
        return self.bundle.thresholds.get("image")

    @property
    def pixel_threshold(self) -> Threshold | None:
        return self.bundle.thresholds.get("pixel")

    @property
    def threshold(self) -> float | None:
        """The image threshold's value: a score above it is anomalous (None: the bundle is not calibrated)."""
        return None if self.image_threshold is None else self.image_threshold.value

    def _runtime(
        self, runtime: str | None, export_dir: Path | str | None, int8: bool
    ) -> tuple[str, ExportedModel | None]:
        """The bundle's serving runtime unless one is asked for; CUDA keeps torch (bf16 autocast beats them there)."""
        asked = runtime is not None
        runtime = runtime or self.bundle.serving.get("runtime") or "torch"
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
        if runtime == "torch" or (self.device.type != "cpu" and not asked):
            return "torch", None
        if self.device.type != "cpu":
            raise ConfigError(f"runtime {runtime} runs on the CPU; on {self.device} use runtime torch")
        if int8:
            raise ConfigError(f"int8=True quantizes the torch model; runtime {runtime} runs the fp32 export")
        return runtime, load_or_export(self, runtime, export_dir)

    @classmethod
    def from_bundle(
        cls,
        path: Path | str,
        device: torch.device | str | None = None,
        batch_size: int = 8,
        int8: bool = False,
        runtime: str | None = None,
        export_dir: Path | str | None = None,
    ) -> Predictor:
        bundle = load_bundle(path)
        return cls(bundle, device=device, batch_size=batch_size, int8=int8, runtime=runtime, export_dir=export_dir)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the bundle's model takes: images are resized to it, maps and masks are judged at it."""
        return self.config.features.image_hw

    def precompile(self) -> None:
        """Ready every batch of up to ``batch_size`` images now: an OpenVINO export compiles its graph once per
        stream count (~0.25 s each), which a server would otherwise make its first requests wait for."""
        if self.exported is not None:
            self.exported.precompile(self.batch_size)

    def template_names(self, indices: Sequence[int]) -> list[str]:
        """Training images (dataset-relative paths) behind template-bank indices, as the bundle records them."""
        record = self.bundle.template
        bank = record.get("bank") or [{"image": record.get("image", "template")}]
        return [str(bank[i]["image"]) for i in indices]

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _score_batch(self, features: torch.Tensor) -> Scored:
        with self._autocast():
            target, predicted, templates = self.model.aggregate(features.to(self.device))
        maps = anomaly_map(target.float(), predicted.float(), self.image_size, self.config.scoring)
        return image_score(maps, self.config.scoring).cpu(), maps.cpu(), templates.cpu()

    def _batched(self, inputs: torch.Tensor, fn: Callable[[torch.Tensor], Scored]) -> Scored:
        scores, maps, templates = [], [], []
        for i in range(0, len(inputs), self.batch_size):
            s, m, t = fn(inputs[i : i + self.batch_size])
            scores.append(s)
            maps.append(m)
            templates.append(t)
        if not scores:
            return (
                torch.empty(0),
                torch.empty(0, *self.image_size),
                torch.empty(0, self.model.nearest, dtype=torch.long),
            )
        if len(scores) == 1:
            # No copy for one batch: torch.cat would run a 2-thread copy whose idle OpenMP thread then spins
            # for milliseconds, on a core the next exported-runtime call needs (~4 % of a `cpu` batch of 8).
            return scores[0], maps[0], templates[0]
        return torch.cat(scores), torch.cat(maps), torch.cat(templates)

    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features [N, C, h, w] → (image scores [N], anomaly maps [N, H, W]), on the CPU."""
        scores, maps, _ = self._batched(features, self._score_batch)
        return scores, maps

    @torch.inference_mode()
    def score_images(self, images: torch.Tensor) -> Scored:
        """Images [N, 3, H, W] in [0, 1] at the model's input size → (scores, maps, template indices), on the CPU."""
        if self.exported is not None:
            return self._batched(images, self.exported.scores)
        # Features back to contiguous: TFA-Net's patch-embedding conv is slower on channels-last input.
        return self._batched(
            images,
            lambda x: self._score_batch(
                self.extractor(x.to(self.device, memory_format=self.memory_format)).float().contiguous()
            ),
        )

    def score_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, 3, H, W] in [0, 1] at the model's input size → (scores [N], maps [N, H, W])."""
        scores, maps, _ = self.score_images(images)
        return scores, maps

    def _to_predictions(self, scored: Scored, return_maps: bool) -> list[Prediction]:
        out = []
        scores, maps, templates = scored
        for score, amap, used in zip(scores.tolist(), maps, templates.tolist(), strict=True):
            flagged = None if self.image_threshold is None else bool(self.image_threshold.is_anomalous(score))
            prediction = Prediction(score, self.threshold, flagged, templates=self.template_names(used))
            if return_maps:
                prediction.anomaly_map = amap.numpy()
                if self.pixel_threshold is not None:
                    prediction.pred_mask = np.asarray(self.pixel_threshold.is_anomalous(prediction.anomaly_map))
            out.append(prediction)
        return out

    def predict(self, images: Sequence[Image.Image], return_maps: bool = False) -> list[Prediction]:
        batch = torch.stack([image_to_tensor(img, self.image_size) for img in images])
        return self._to_predictions(self.score_images(batch), return_maps)

    def predict_paths(self, paths: Iterable[Path | str], return_maps: bool = False) -> list[Prediction]:
        paths = list(paths)
        out: list[Prediction] = []
        for i in range(0, len(paths), self.batch_size):
            out += self.predict([load_rgb(Path(p)) for p in paths[i : i + self.batch_size]], return_maps)
        return out


def quantize_linear_int8(model: TemplateAggregator) -> TemplateAggregator:
    """A copy of ``model`` whose ``nn.Linear`` layers run int8 dynamic quantization (fbgemm, CPU)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao; it is still the only route without a new
        # dependency, and the benchmark re-measures it on every torch upgrade.
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return quantized.eval()
