"""What runs inside a kfp component's container: artifacts ↔ :class:`components.steps.ProductPaths`, data, publish.

Kept apart from :mod:`components.kfp_components` because kfp's runtime (``_KFP_RUNTIME=true``)
strips ``kfp.dsl`` down to the artifact types, so a module that defines components cannot be
imported inside one.

**Every artifact is a directory holding a piece of one product's ``RUNS/<product>/`` tree**
(:data:`ARTIFACT_CONTENTS`): :func:`run_step` lays a step's input artifacts side by side into a
temporary product tree, runs the step function of :mod:`components.steps` on it (the function
``dvc.yaml`` calls), and copies what it wrote into the output artifacts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tfanet_core.errors import TfanetError

if TYPE_CHECKING:
    from kfp.dsl import Artifact, Metrics

__all__ = ["ARTIFACT_CONTENTS", "fetch_dataset", "log_numbers", "run_step"]

# Artifact name -> the entries of RUNS/<product>/ it carries (relative paths, as ProductPaths names them).
ARTIFACT_CONTENTS: dict[str, tuple[str, ...]] = {
    "manifest": ("manifest.csv", "dataset.json"),
    "validation": ("validation",),
    "features": ("features",),
    "template": ("template.json",),
    "model": ("model", "history.json"),
    "evaluation": ("metrics.json", "scores.json", "plots", "overlays"),
    "bundle": ("bundle", "calibration.json", "calibration.png"),
    "registry": ("registry.json",),
}


# --- runs inside the component's container -----------------------------------------------------------


def fetch_dataset(dataset_uri: str, category: str, work: Path, s3_endpoint: str = "") -> Path:
    """The dataset root holding ``<category>/``: the local path itself, or that folder downloaded from S3."""
    if not dataset_uri.startswith("s3://"):
        root = Path(dataset_uri)
        if not (root / category).is_dir():
            raise TfanetError(f"{root / category}: no such dataset folder (dataset_uri={dataset_uri!r})")
        return root
    from components.storage import download_dir, parse_s3_uri, s3_for

    bucket, prefix = parse_s3_uri(dataset_uri)
    root = work / "data"
    key = f"{prefix}/{category}" if prefix else category
    download_dir(s3_for(s3_endpoint), bucket, key, root / category, progress=False)
    return root


def run_step(
    step: str,
    *,
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    inputs: Mapping[str, Artifact],
    outputs: Mapping[str, Artifact],
    s3_endpoint: str = "",
    checkpoint_uri: str = "",
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``components.steps.<step>`` on a product tree made of ``inputs``; copy its results into ``outputs``.

    ``params`` is the product's section of params.yaml as JSON. ``inputs``/``outputs`` map artifact
    names of :data:`ARTIFACT_CONTENTS` to kfp artifacts. Step ``validate`` runs prepare first (the
    manifest is what it validates). ``kwargs`` go to the step function (``rules`` for validate,
    ``promotion``/``tracking_uri`` for register). ``checkpoint_uri`` (train): the durable copy of the
    tree's ``checkpoints/`` (:class:`components.checkpoints.CheckpointMirror`), restored before the step and
    kept current while it runs; the result then lists the files restored under ``restored_checkpoints``.
    """
    from contextlib import nullcontext

    from components import steps
    from components.checkpoints import CheckpointMirror
    from components.params import ProductSettings
    from tfanet_core.allocator import keep_freed_memory

    keep_freed_memory()  # what the `tfanet` command does for the same steps on one machine
    section = json.loads(params)
    with tempfile.TemporaryDirectory(prefix=f"tfanet-{step}-") as tmp:
        work = Path(tmp)
        paths = steps.ProductPaths(work / "runs" / product)
        paths.root.mkdir(parents=True)
        for name, artifact in inputs.items():
            _expect(name)
            shutil.copytree(artifact.path, paths.root, dirs_exist_ok=True)
        data_root = fetch_dataset(dataset_uri, ProductSettings.of(product, section).category, work, s3_endpoint)
        if step == "validate":
            steps.prepare(data_root, product, section, paths)
            result = steps.validate(data_root, kwargs["rules"], paths)
        elif step == "register":
            result = steps.register(data_root, product, section, paths, **kwargs)
        else:
            mirror = CheckpointMirror(paths.checkpoints, checkpoint_uri, s3_endpoint) if checkpoint_uri else None
            with mirror or nullcontext():
                result = getattr(steps, step)(data_root, product, section, paths, **kwargs)
            if mirror is not None:
                result = {**result, "restored_checkpoints": mirror.restored}
        for name, artifact in outputs.items():
            out = Path(artifact.path)
            out.mkdir(parents=True, exist_ok=True)
            for rel in _expect(name):
                source = paths.root / rel
                if source.is_dir():
                    shutil.copytree(source, out / rel, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, out / rel)
            artifact.metadata.update({"product": product, "dataset_version": dataset_version})
    return result


def _expect(name: str) -> tuple[str, ...]:
    if name not in ARTIFACT_CONTENTS:
        raise ValueError(f"unknown artifact {name!r}; expected one of {sorted(ARTIFACT_CONTENTS)}")
    return ARTIFACT_CONTENTS[name]


def log_numbers(metrics: Metrics, values: Mapping[str, Any], prefix: str = "") -> None:
    """Every finite number of ``values`` (nested dicts flattened with dots) as a KFP metric."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            log_numbers(metrics, value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            metrics.log_metric(name, float(value))
