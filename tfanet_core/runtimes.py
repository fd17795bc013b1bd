"""Exported runtimes: a bundle's whole inference path as one ONNX or OpenVINO graph, and the parity it must keep.

The graph takes images [N, 3, H, W] in [0, 1] (any N) and returns (scores [N], maps [N, H, W], template-bank
indices [N, nearest]): backbone, standardization, the nearest-template lookup, TFA-Net with the template bank
folded in as a constant, anomaly map, Gaussian blur and image score. Nothing is recomputed or re-decided at
serving time; the threshold travels beside the graph in ``export.json`` with the bundle's digest, the runtime's
version and the parity measured when it was written.

An export is only ever written or used after its scores were compared with the torch bundle's on a probe
set (normal images plus synthetic defects drawn onto them): refused above ``PARITY_TOLERANCE`` (relative) or
on any decision that flips at the threshold. OpenVINO is pinned to fp32 both in the file (no fp16 weight
compression) and at compile time: on CPUs with AMX/AVX-512 bf16 its default precision is bf16, which moves
scores by about 0.3 %.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tfanet_core.bundle import Bundle
from tfanet_core.config import Config, as_hw
from tfanet_core.errors import ConfigError
from tfanet_core.features import FeatureExtractor, sha256_file
from tfanet_core.model import TemplateAggregator
from tfanet_core.scoring import anomaly_map, image_score

if TYPE_CHECKING:  # the predictor runs exports; an export is checked against the predictor's torch path
    from tfanet_core.predictor import Predictor

RUNTIMES = ("torch", "onnxruntime", "openvino")
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format → the runtime that runs it
GRAPH_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
MANIFEST_FILE = "export.json"
OPSET = 20
# Max |score_runtime − score_torch| / |score_torch| over the probe set; the same fp32 maths in another order
# stays near 1e-6 (benchmarks/results/perf.md), so 1e-5 leaves room for kernels without hiding a real change.
PARITY_TOLERANCE = 1e-5
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>": a container's CPU limit


class ExportError(ValueError):
    """An export cannot be written or used: missing, made from another bundle, altered, or out of parity."""


def format_of(runtime: str) -> str:
    for fmt, rt in FORMATS.items():
        if rt == runtime:
            return fmt
    raise ConfigError(f"runtime {runtime!r} has no export format; exported runtimes: {sorted(FORMATS.values())}")


def bundle_digest(bundle: Bundle) -> str:
    """sha256 of what decides a bundle's scores: its metadata (less the serving choice) and every weight tensor."""
    meta = {k: v for k, v in bundle.metadata().items() if k not in ("serving", "tfanet_version")}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in sorted(bundle.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class InferenceGraph(nn.Module):
    """Images → (scores, maps): the predictor's torch path as one module, the thing that gets exported."""

    def __init__(self, extractor: FeatureExtractor, model: TemplateAggregator, config: Config) -> None:
        super().__init__()
        self.extractor = extractor
        self.model = model.eval()
        self.config = config
        self.eval()
        model.warm_cache()  # template tokens and bank keys: traced as constants

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.extractor.fuse(self.extractor.layer_maps(images))
        target, predicted, templates = self.model.aggregate(features)
        maps = anomaly_map(target, predicted, self.config.features.image_hw, self.config.scoring)
        return image_score(maps, self.config.scoring), maps, templates


# --- probe set and parity -------------------------------------------------------------------------------------


def probe_images(
    image_size: int | tuple[int, int], normals: torch.Tensor | None = None, count: int = 4, seed: int = 0
) -> torch.Tensor:
    """Normal images plus one synthetic defect drawn onto each (CutPaste, blob or scratch), [2N, 3, H, W].

    Without ``normals`` (a bundle carries no images) smooth random textures stand in for them: parity is a
    property of the arithmetic, and what it must cover is a spread of scores on both sides of a threshold.
    """
    from tfanet_core.pseudo_anomalies import synthesize

    if normals is None:
        size = as_hw(image_size)
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(count, 3, 8, 8, generator=generator)
        fine = 0.1 * torch.rand(count, 3, *size, generator=generator)
        smooth = F.interpolate(coarse, size, mode="bilinear", align_corners=False)
        normals = (0.8 * smooth + fine).clamp(0, 1)
    defects = synthesize(normals, normals, per_image=1, seed=seed)
    return torch.cat([normals, defects.images.to(normals.dtype)])


@dataclass
class Parity:
    """Scores of an exported runtime against the torch bundle's on the same probe images."""

    runtime: str
    tolerance: float
    images: int
    max_relative_difference: float
    max_abs_difference: float
    decision_flips: int
    threshold: float | None
    reasons: list[str] = field(default_factory=list)

    @classmethod
    def refusal(cls, runtime: str, tolerance: float, threshold: float | None, reason: str) -> Parity:
        """The verdict on an export that could not even be scored (missing, altered, another bundle's)."""
        return cls(runtime, tolerance, 0, float("nan"), float("nan"), 0, threshold, [reason])

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare_scores(
    reference: torch.Tensor, scores: torch.Tensor, threshold: float | None, tolerance: float, runtime: str
) -> Parity:
    """Parity of ``scores`` with ``reference``: the relative tolerance and not one decision flipped at the threshold."""
    reference, scores = reference.double(), scores.double()
    abs_diff = (scores - reference).abs()
    relative = abs_diff / reference.abs().clamp_min(1e-12)
    flips = 0 if threshold is None else int(((scores > threshold) != (reference > threshold)).sum())
    parity = Parity(runtime, tolerance, len(reference), float(relative.max()), float(abs_diff.max()), flips, threshold)
    if not bool(torch.isfinite(scores).all()):
        parity.reasons.append(f"{runtime} returned non-finite scores")
    if parity.max_relative_difference > tolerance:
        worst = int(relative.argmax())
        parity.reasons.append(
            f"{runtime} scores differ from the torch bundle's by up to {parity.max_relative_difference:.3g} relative "
            f"(> {tolerance:g}; probe {worst}: {float(scores[worst]):.6g} vs {float(reference[worst]):.6g})"
        )
    if flips:
        parity.reasons.append(f"{flips} of {len(reference)} probe decisions flip at the threshold {threshold:.6g}")
    return parity


# --- running an export ----------------------------------------------------------------------------------------


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's CPU
    limit, which ``os.cpu_count()`` ignores: a pod limited to 2 CPUs on a 64-core node would start 64
    threads per worker and spend its quota waiting)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the affinity mask is the limit
    return cores


def threads_per_worker(workers: int) -> int:
    """Intra-op threads of each of ``workers`` serving processes: the usable cores shared out, so that the
    workers' thread pools never oversubscribe them (oversubscribed pools spin against each other)."""
    return max(1, usable_cores() // max(1, workers))


class ExportedModel:
    """A loaded export: ``scores(images)`` runs it with ``threads`` intra-op threads (default: torch's)."""

    def __init__(self, directory: Path | str, threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.runtime: str = self.manifest["runtime"]
        self.threads = threads or torch.get_num_threads()
        self._run = _load_runtime(self.directory, self.manifest["format"], self.threads)

    def precompile(self, max_batch: int) -> None:
        """Get every batch of 1..``max_batch`` images ready to run now rather than on its first request: a
        long-running server calls it once loaded, so that no request pays a compile."""
        self._run.precompile(max_batch)

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [N, 3, H, W] in [0, 1] → (scores [N], maps [N, H, W], template indices [N, nearest]) on the CPU."""
        score, amap, templates = self._run(np.ascontiguousarray(images.detach().cpu().float().numpy()))
        return (
            torch.from_numpy(np.asarray(score)),
            torch.from_numpy(np.asarray(amap)),
            torch.from_numpy(np.asarray(templates)).long(),
        )


Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]
OUTPUTS = ("score", "map", "template")


def _load_runtime(directory: Path, fmt: str, threads: int) -> Runner:
    if fmt == "onnx":
        return OnnxRuntimeRunner(directory / GRAPH_FILES["onnx"][0], threads)
    if fmt == "openvino":
        return OpenVINORunner(directory / GRAPH_FILES["openvino"][0], threads)
    raise ExportError(f"{directory}: unknown export format {fmt!r} in {MANIFEST_FILE}; known: {sorted(GRAPH_FILES)}")


class Runner(Protocol):
    """An exported graph loaded into its runtime: images [N, 3, H, W] as float32 numpy → :data:`OUTPUTS`."""

    def __call__(self, x: np.ndarray) -> Outputs: ...

    def precompile(self, max_batch: int) -> None: ...


class OnnxRuntimeRunner:
    """The ONNX graph in an ONNX Runtime CPU session: one session runs every batch size as it comes."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> Outputs:
        score, amap, templates = self.session.run(list(OUTPUTS), {"images": x})
        return score, amap, templates

    def precompile(self, max_batch: int) -> None:
        """Nothing to do: ONNX Runtime does not compile per batch shape."""


class OpenVINORunner:
    """The OpenVINO graph on the CPU, one image per inference request: a single image runs on every thread
    (the latency path), several run in turns of one image per single-threaded stream, one stream per thread.

    Both choices are measured (``cpu`` profile, 2 cores, benchmarks/README.md). Two independent streams beat
    one 2-thread request of 8 images by ~15 % (Intel Xeon): the backbone's depthwise convolutions on small
    maps keep two threads of one request waiting on each other. One image per request beats four by a further
    ~8 % (AMD EPYC, Zen 3): one image's activations stay in the caches from layer to layer (the backbone's
    first expansion writes 6 MB per image, 25 MB for four). So the graph is compiled for a static batch of one,
    once per stream count: at most two compiles of ~0.25 s, whatever batch sizes come, no padding of ragged
    batches, and ~390 MB less resident than one compiled model per batch shape of up to 8 images.

    Plain infer requests, not ``ov.AsyncInferQueue``: with it, whose results come back through a Python
    callback on OpenVINO's threads, a CI run aborted once in one of those threads.
    """

    def __init__(self, xml: Path, threads: int, extra_config: dict[str, Any] | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(xml))
        image = [dim.get_length() for dim in list(self.model.input("images").get_partial_shape())[1:]]
        self.model.reshape({"images": [1, *image]})
        self.threads = threads
        self.extra_config = extra_config or {}  # e.g. PERF_COUNT for the bench's per-node timers
        self._compiled: dict[int, tuple[Any, list[Any]]] = {}  # streams → (compiled model, one request each)

    def streams(self, n: int) -> int:
        """How many single-image requests a batch of ``n`` images runs at once."""
        return 1 if n == 1 else self.threads

    def precompile(self, max_batch: int) -> None:
        """Compile now what a batch of 1..``max_batch`` images runs on, rather than on the first such batch.

        Without it a served worker compiled on its first request of each kind: when it compiled one model per
        batch shape, the load test's p99 was 509 ms against a p50 of 162 ms (`cpu` profile, AMD EPYC, 2 cores).
        """
        for streams in sorted({self.streams(n) for n in range(1, max_batch + 1)}):
            self.requests(streams)

    def requests(self, streams: int) -> tuple[Any, list[Any]]:
        """The model compiled for ``streams`` streams sharing ``self.threads`` threads, and one request per stream."""
        if streams not in self._compiled:
            hint = "LATENCY" if streams == 1 else "THROUGHPUT"
            # f32 always: on AMX/AVX-512-bf16 CPUs OpenVINO's default is bf16, which fails parity.
            config = {
                "INFERENCE_PRECISION_HINT": "f32",
                "NUM_STREAMS": streams,
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": hint,
                **self.extra_config,
            }
            compiled = self.core.compile_model(self.model, "CPU", config)
            self._compiled[streams] = (compiled, [compiled.create_infer_request() for _ in range(streams)])
        return self._compiled[streams]

    def each_image(self, x: np.ndarray) -> Iterator[Any]:
        """Run ``x`` one image per request, as many at a time as there are streams; yield each request once its
        image is done, in image order (its outputs are overwritten by its next image)."""
        _, requests = self.requests(self.streams(len(x)))
        for start in range(0, len(x), len(requests)):
            running = requests[: len(x) - start]
            for j, request in enumerate(running):
                request.start_async({"images": x[start + j : start + j + 1]}, share_inputs=True)
            for request in running:
                request.wait()
                yield request

    def __call__(self, x: np.ndarray) -> Outputs:
        compiled, _ = self.requests(self.streams(len(x)))
        outputs = [compiled.output(name) for name in OUTPUTS]
        rows = [[request.get_tensor(output).data.copy() for output in outputs] for request in self.each_image(x)]
        score, amap, templates = (np.concatenate(parts) for parts in zip(*rows, strict=True))
        return score, amap, templates


def read_manifest(directory: Path | str) -> dict[str, Any]:
    """``export.json`` of an export directory, its graph files checked against the sha256 recorded there."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(
            f"{directory} is not a tfanet export: {MANIFEST_FILE} is missing (write one with `tfanet export`)"
        )
    manifest = json.loads(path.read_text())
    for name, expected in manifest.get("files", {}).items():
        if not (directory / name).is_file():
            raise ExportError(f"{directory}: {name} is missing; export the bundle again")
        actual = sha256_file(directory / name)
        if actual != expected:
            raise ExportError(
                f"{directory}/{name} was altered after export: sha256 {actual[:12]}… but {MANIFEST_FILE} records "
                f"{expected[:12]}…; export the bundle again (`tfanet export`)"
            )
    return manifest


# --- writing an export ----------------------------------------------------------------------------------------


def runtime_version(runtime: str) -> str:
    return torch.__version__ if runtime == "torch" else version(runtime)


def _write_graph(graph: InferenceGraph, fmt: str, directory: Path, image_size: tuple[int, int]) -> None:
    example = torch.rand(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_path = directory / GRAPH_FILES["onnx"][0]
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=list(OUTPUTS),
            dynamic_shapes={"images": {0: batch}},
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(onnx_path))
    if fmt == "openvino":
        import openvino as ov

        # compress_to_fp16=False: OpenVINO stores fp16 weights by default, which alone moves scores ~1e-3.
        ov.save_model(ov.convert_model(str(onnx_path)), str(directory / GRAPH_FILES["openvino"][0]), False)
        onnx_path.unlink()


def export_bundle(
    reference: Predictor,
    fmt: str,
    out: Path | str,
    *,
    normals: torch.Tensor | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> Path:
    """Write ``out`` (a directory, replaced atomically): the graph of ``reference``'s bundle in ``fmt`` and
    ``export.json``. ``reference`` is a torch-runtime CPU predictor: the scores the export must reproduce.

    Refuses (``ExportError``, nothing written) when the export's scores on the probe set are out of parity.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if reference.exported is not None or reference.device.type != "cpu":
        raise ValueError("export_bundle needs a torch-runtime CPU predictor as its reference")
    bundle, out = reference.bundle, Path(out)
    size = bundle.config.features.image_hw
    backbone = copy.deepcopy(reference.extractor).to(memory_format=torch.contiguous_format)
    graph = InferenceGraph(backbone, bundle.model, bundle.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_graph(graph, fmt, tmp, size)
        runtime = FORMATS[fmt]
        manifest = {
            "format": fmt,
            "runtime": runtime,
            "runtime_version": runtime_version(runtime),
            "opset": OPSET,
            "exported_with": {"torch": torch.__version__, "onnx": version("onnx"), "onnxscript": version("onnxscript")},
            "bundle_sha256": bundle_digest(bundle),
            "profile": bundle.config.profile,
            "image_size": list(size),
            "inputs": {"images": ["batch", 3, *size]},
            "outputs": {"score": ["batch"], "map": ["batch", *size], "template": ["batch", bundle.model.nearest]},
            "threshold": reference.threshold,
            "files": {name: sha256_file(tmp / name) for name in GRAPH_FILES[fmt]},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        parity = measure_parity(reference, ExportedModel(tmp), probe_images(size, normals), tolerance)
        if not parity.passed:
            raise ExportError(f"export to {fmt} refused: " + "; ".join(parity.reasons))
        manifest["parity"] = parity.to_json()
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def measure_parity(reference: Predictor, exported: ExportedModel, probes: torch.Tensor, tolerance: float) -> Parity:
    """Score ``probes`` with the torch ``reference`` predictor and with ``exported`` (batch 1, then the rest)."""
    expected, _, expected_templates = reference.score_images(probes)
    first, _, first_templates = exported.scores(probes[:1])
    rest, _, rest_templates = exported.scores(probes[1:])
    parity = compare_scores(expected, torch.cat([first, rest]), reference.threshold, tolerance, exported.runtime)
    moved = int((torch.cat([first_templates, rest_templates]) != expected_templates).any(dim=1).sum())
    if moved:
        parity.reasons.append(f"{moved} of {len(probes)} probes are aggregated onto another template than in torch")
    return parity


def verify_export(
    reference: Predictor,
    directory: Path | str,
    *,
    normals: torch.Tensor | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """The deploy gate: is ``directory`` an unaltered export of ``reference``'s bundle, in parity on this machine?

    Every failure is a reason in the returned :class:`Parity` (it never raises for a bad export), so the
    caller can refuse with the reason and record the figures.
    """
    runtime = "unknown"

    def refused(reason: str) -> Parity:
        return Parity.refusal(runtime, tolerance, reference.threshold, reason)

    try:
        manifest = read_manifest(directory)
        runtime = manifest.get("runtime", runtime)
        digest = bundle_digest(reference.bundle)
        if manifest.get("bundle_sha256") != digest:
            return refused(
                f"the export in {directory} was made from bundle {str(manifest.get('bundle_sha256'))[:12]}…, "
                f"not from this bundle ({digest[:12]}…)"
            )
        exported = ExportedModel(directory)
    except ExportError as exc:
        return refused(str(exc))
    probes = probe_images(reference.bundle.config.features.image_hw, normals)
    return measure_parity(reference, exported, probes, tolerance)


def default_export_root() -> Path:
    """Where exports made on first use are kept: ``$TFANET_EXPORT_DIR`` or ``~/.cache/tfanet/exports``."""
    return Path(os.environ.get("TFANET_EXPORT_DIR", Path.home() / ".cache" / "tfanet" / "exports"))


def load_or_export(
    reference: Predictor, runtime: str, directory: Path | str | None = None, threads: int | None = None
) -> ExportedModel:
    """``reference``'s bundle exported for ``runtime``, read from ``directory`` (default: the export cache, keyed
    by the bundle's digest) and exported there first where none is stored. An export of another bundle is an error."""
    fmt = format_of(runtime)
    digest = bundle_digest(reference.bundle)
    path = Path(directory) if directory is not None else default_export_root() / digest[:16] / fmt
    if not (path / MANIFEST_FILE).is_file():
        export_bundle(reference, fmt, path)
    manifest = read_manifest(path)
    if manifest.get("bundle_sha256") != digest:
        raise ExportError(
            f"{path} holds an export of bundle {str(manifest.get('bundle_sha256'))[:12]}…, not of this bundle "
            f"({digest[:12]}…); export this one with `tfanet export` or remove {path}"
        )
    if manifest.get("format") != fmt:
        raise ExportError(f"{path} holds a {manifest.get('format')} export; runtime {runtime} needs {fmt}")
    return ExportedModel(path, threads)


#: A process whose threads together used under a tenth of this much CPU time in this much wall time is quiet.
QUIET_S = 0.005


def wait_until_quiet(limit_s: float = 1.0) -> bool:
    """Return once no thread of this process has kept a core busy for :data:`QUIET_S` (True), or after
    ``limit_s`` (False): a runtime's pool threads spin for a while after its call returns, waiting for more.

    Measured on an AMD EPYC (AVX2, 2 cores): an OpenVINO image timed after an ONNX Runtime call and one untimed
    OpenVINO call took 31.6 ms at the median; waiting here first, 21.6 ms, as without ONNX Runtime before it.
    """
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        used = time.process_time()
        time.sleep(QUIET_S)
        if time.process_time() - used < QUIET_S / 10:
            return True
    return False


def settle(call: Callable[[], Any]) -> None:
    """Make the next timed ``call()`` pay only for itself, when runtimes take turns on the same cores: wait for
    the threads of whatever ran before to stop spinning (:func:`wait_until_quiet`), then one untimed call.

    Without the wait, ONNX Runtime's intra-op pool added 9 ms to the 14 ms OpenVINO image timed right after it
    (Intel Xeon), and on an AMD EPYC one untimed OpenVINO call of 22 ms was not enough to outlast it. The
    untimed call warms the caches for this runtime and leaves its own threads as back-to-back requests of one
    runtime are served: a runtime's spinning after its own call is part of its speed.
    """
    wait_until_quiet()
    call()


def measure_speed(
    reference: Predictor, exported: dict[str, ExportedModel], images: torch.Tensor, rounds: int = 3
) -> dict[str, float]:
    """Images/s of the torch ``reference`` and of each export on ``images`` (one call = one batch), the median
    of ``rounds`` round-robin rounds, so that every runtime sees the same machine load; each timed call
    follows an untimed one of the same runtime (:func:`settle`). Six calls per runtime: a deploy of the
    ``paper`` profile on a CPU spends ~10 s per torch call of 8 images (2 threads, perf.md)."""
    runners = {"torch": reference.score_images, **{runtime: model.scores for runtime, model in exported.items()}}
    seconds: dict[str, list[float]] = {runtime: [] for runtime in runners}
    for _ in range(rounds):
        for runtime, run in runners.items():
            settle(partial(run, images))
            start = time.perf_counter()
            run(images)
            seconds[runtime].append(time.perf_counter() - start)
    return {runtime: len(images) / statistics.median(spent) for runtime, spent in seconds.items()}
