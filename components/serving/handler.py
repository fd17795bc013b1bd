"""TorchServe handler for one product's TFA-Net: a thin adapter between TorchServe and the predictor.

The archive (see ``archive.py``) holds the bundle under ``bundle/``, its export under ``export/`` when
it is served on ONNX Runtime or OpenVINO, ``serving.json`` (product, model version, runtime, workers,
where the model came from) and ``payload.py``, the server-agnostic request parsing
and response building. This file only maps TorchServe's batch and context onto those two and onto
``tfanet_core.predictor.Predictor``: the same loader and inference as the CLI and evaluation.

TorchServe requires exactly one class at module level here (a second one makes the worker exit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tfanet_core.allocator import keep_freed_memory, release_freed_memory
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import threads_per_worker

try:
    from .payload import ParsedRequest, RequestError, build_response, parse_request
except ImportError:  # inside the .mar this file is the top-level module `handler`; payload.py sits beside it
    from payload import ParsedRequest, RequestError, build_response, parse_request  # type: ignore[no-redef,import-not-found]

MANIFEST_FILE = "serving.json"
BUNDLE_DIR = "bundle"
EXPORT_DIR = "export"
JSON = "application/json"

log = logging.getLogger(__name__)


class TFANetHandler:
    """``initialize`` loads the bundle once per worker; ``handle`` answers a batch, one response per request."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.product = ""
        self.model_version = ""

    def initialize(self, context: Any) -> None:
        keep_freed_memory()  # this worker process is an entry point: as in the deploy that timed the runtimes
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
        self.product = manifest["product"]
        self.model_version = str(manifest["model_version"])
        gpu = props.get("gpu_id")
        device = f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu"
        runtime = manifest.get("runtime", "torch") if device == "cpu" else "torch"
        # Counted here, on the serving machine (a pod's CPU limit included), not where the archive was built.
        torch.set_num_threads(threads_per_worker(int(manifest.get("workers", 1))))  # the exports use as many
        self.predictor = Predictor.from_bundle(
            model_dir / BUNDLE_DIR,
            device=device,
            batch_size=props["batch_size"],
            runtime=runtime,
            export_dir=model_dir / EXPORT_DIR if runtime != "torch" else None,
        )
        self.predictor.precompile()  # every batch size TorchServe may send, compiled before the first request
        release_freed_memory()  # what loading used, so the worker keeps only its batches' working set
        log.info(
            "tfanet %s version %s loaded on %s, runtime %s (%d threads)",
            self.product,
            self.model_version,
            device,
            runtime,
            torch.get_num_threads(),
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """A bad request gets its own 4xx (status via ``set_response_status``); the others are still scored."""
        if self.predictor is None:
            raise RuntimeError("handle() before initialize(): TorchServe did not load the model")
        out: list[bytes] = [b""] * len(data)
        parsed: dict[int, ParsedRequest] = {}
        for i, row in enumerate(data):
            context.set_response_content_type(i, JSON)
            headers = _lower(context.get_all_request_header(i))
            try:
                parsed[i] = parse_request(_body(row), headers.get("x-return-map"), headers.get("content-type"))
            except RequestError as err:
                context.set_response_status(err.status, err.reason, i)
                out[i] = json.dumps(err.to_json()).encode()
        if parsed:
            want_maps = any(p.return_map for p in parsed.values())
            predictions = self.predictor.predict([p.image for p in parsed.values()], return_maps=want_maps)
            for (i, request), prediction in zip(parsed.items(), predictions, strict=True):
                response = build_response(prediction, self.product, self.model_version, request.return_map)
                out[i] = json.dumps(response).encode()
        return out


def _lower(headers: dict[str, Any] | None) -> dict[str, Any]:
    """HTTP header names are case-insensitive; TorchServe passes them as the client spelled them."""
    return {str(k).lower(): v for k, v in (headers or {}).items()}


def _body(row: dict[str, Any]) -> Any:
    """TorchServe names a raw body ``body`` (``data`` for some clients); multipart fields keep their own names."""
    for key in ("body", "data", "image", "file"):
        if row.get(key) is not None:
            return row[key]
    return None
