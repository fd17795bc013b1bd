"""``training_pipeline`` without a cluster: kfp's local subprocess runner, in this venv.

``kfp.local`` runs each task as a subprocess of this Python (``use_venv=False``: the components
import ``components`` from the installed package instead of a fresh venv per task). It supports
no ParallelFor, no conditions, no caching and no resource requests (the train step's GPU request is
ignored with a warning), so only ``training_pipeline`` runs here; the multi-product and retrain
pipelines need Kubeflow Pipelines. Each task inherits this process's environment, which is how
S3 credentials (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) reach a step reading ``s3://``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_local"]


def run_local(arguments: dict[str, Any], pipeline_root: Path | str) -> dict[str, str]:
    """Run ``training_pipeline(**arguments)`` locally; outputs and artifacts go under ``pipeline_root``.

    Returns the pipeline's outputs: the registered ``version`` and the gate's ``decision``. Raises
    ``RuntimeError`` naming the failed task when a step fails (its log is on stderr above).
    """
    from kfp import local

    from pipelines.training import training_pipeline

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    task = training_pipeline(**arguments)
    return {key: str(value) for key, value in task.outputs.items()}
