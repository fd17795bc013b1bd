"""Package a model bundle as ``tfanet-<product>.mar`` for TorchServe.

The archive holds the bundle unchanged under ``bundle/`` (so the handler loads it with the one
loader, ``load_bundle``), the bundle's parity-checked export under ``export/`` when it is served on an
exported runtime (ONNX Runtime, OpenVINO), ``payload.py`` beside the handler, and ``serving.json``:
product, model version (= the MLflow registry version once the registry step passes it), runtime,
workers and where the bundle came from. The TorchServe model version is the same string,
so ``/predictions/tfanet-<product>/<version>`` and the ``model_version`` field of every response name the
registry version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.naming import torchserve_model_name
from components.serving.handler import BUNDLE_DIR, EXPORT_DIR, MANIFEST_FILE
from tfanet_core.bundle import METADATA_FILE, WEIGHTS_FILE, read_metadata
from tfanet_core.runtimes import read_manifest as read_export_manifest

HERE = Path(__file__).resolve().parent
HANDLER = HERE / "handler.py"
PAYLOAD = HERE / "payload.py"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ArchiveError(RuntimeError):
    """The archive could not be built; the message says why and what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _archiver() -> Path:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    if not exe.is_file():
        raise ArchiveError(f"{exe} not found: install the serving extras (`pip install -e '.[mlops]'`)")
    return exe


def build_archive(
    bundle: Path | str,
    product: str,
    model_version: str,
    export_dir: Path | str,
    *,
    source: dict[str, Any] | None = None,
    filename: str | None = None,
    export: Path | str | None = None,
    workers: int = 1,
) -> Path:
    """Build ``export_dir/<filename>`` (default ``tfanet-<product>.mar``) from a bundle; returns its path.

    ``source`` describes the model's origin for the record (the registry step passes e.g.
    ``{"kind": "mlflow", "registered_model": ..., "version": ..., "run_id": ...}``); without it the
    bundle's path is recorded. The file is replaced atomically, so a server never reads half of it.

    ``export``: an export directory of this bundle (``tfanet export``; the deploy gate has checked it): the
    handler then runs it instead of torch. ``workers``: TorchServe workers of this version; the handler
    gives each ``usable cores // workers`` intra-op threads, counted on the machine that serves
    (``tfanet_core.runtimes.threads_per_worker``), so that workers × threads never exceeds its cores.
    """
    bundle = Path(bundle).resolve()
    if not _NAME.match(product):
        raise ArchiveError(f"product {product!r} is not a valid TorchServe model name part: use letters, digits, _ . -")
    if not _VERSION.match(str(model_version)):
        raise ArchiveError(f"model version {model_version!r} must be letters, digits, _ . - (e.g. the registry's '3')")
    meta = read_metadata(bundle)
    exported = read_export_manifest(export) if export is not None else None
    name = torchserve_model_name(product)
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "model_name": name,
        "product": product,
        "model_version": str(model_version),
        "category": meta.get("dataset", {}).get("category"),
        "bundle": {
            "files": {f: _sha256(bundle / f) for f in (METADATA_FILE, WEIGHTS_FILE)},
            "tfanet_version": meta.get("tfanet_version"),
            "backbone": meta.get("backbone", {}).get("tag"),
            "profile": meta.get("config", {}).get("profile"),
        },
        "runtime": exported["runtime"] if exported else "torch",
        "workers": workers,
        "export": {k: exported[k] for k in ("format", "runtime_version", "bundle_sha256", "parity")}
        if exported
        else None,
        "source": source or {"kind": "bundle", "path": str(bundle)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory(prefix=f"{name}-mar-") as tmp:
        stage = Path(tmp) / "stage"
        (stage / BUNDLE_DIR).mkdir(parents=True)
        for f in (METADATA_FILE, WEIGHTS_FILE):
            shutil.copy2(bundle / f, stage / BUNDLE_DIR / f)
        if export is not None:
            shutil.copytree(export, stage / EXPORT_DIR)
        shutil.copy2(PAYLOAD, stage / PAYLOAD.name)
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        out = Path(tmp) / "out"
        out.mkdir()
        cmd = [
            str(_archiver()),
            *("--model-name", name, "--version", str(model_version), "--handler", str(HANDLER)),
            *("--extra-files", str(stage), "--export-path", str(out), "--force"),
        ]
        # The archiver stages files in $TMPDIR/<model-name>: a private TMPDIR keeps parallel builds apart.
        env = {**os.environ, "TMPDIR": tmp}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        built = out / f"{name}.mar"
        if proc.returncode != 0 or not built.is_file():
            raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        target = export_dir / (filename or f"{name}.mar")
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(built, partial)
        os.replace(partial, target)
    return target


def read_manifest(mar: Path | str) -> dict[str, Any]:
    """``serving.json`` of a built archive: what a deploy step checks before registering it."""
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read(MANIFEST_FILE))
