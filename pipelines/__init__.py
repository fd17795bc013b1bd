"""Kubeflow Pipelines (kfp v2) for tfanet: the pipeline definitions, compile, submit and local run.

Only names and paths here, so that ``tfanet`` (which registers ``tfanet pipeline``) starts
without importing kfp.
"""

from pathlib import Path

__all__ = ["COMPILED", "NAMES"]

COMPILED = Path(__file__).resolve().parent / "compiled"
NAMES = ("training", "multi_product", "retrain_on_drift")  # pipelines/compiled/<name>.yaml
