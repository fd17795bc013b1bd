"""Compile every pipeline to ``pipelines/compiled/<name>.yaml``: ``python -m pipelines.compile``.

The compiled YAML is committed: it is what the KFP UI uploads and ``tfanet pipeline submit``
sends, and ``tests/test_pipelines.py`` fails when it is stale (compiling is deterministic).
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfp import compiler

from pipelines import COMPILED, NAMES
from pipelines.training import multi_product_pipeline, retrain_on_drift_pipeline, training_pipeline
from tfanet_core.errors import ConfigError

__all__ = ["COMPILED", "PIPELINES", "compile_all", "compiled_path", "main"]

PIPELINES = dict(zip(NAMES, (training_pipeline, multi_product_pipeline, retrain_on_drift_pipeline), strict=True))


def compiled_path(name: str, out_dir: Path | str = COMPILED) -> Path:
    """Where pipeline ``name`` is compiled to; ValueError naming the known pipelines for any other name."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
    return Path(out_dir) / f"{name}.yaml"


_HEADER_DEFAULT = re.compile(r"^(#    \w+: (?:dict|list) \[Default: )(.*)(\])$", re.M)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, list) else value


def _stable_header(text: str) -> str:
    """kfp's header comment prints dict defaults in protobuf map order, which changes with the hash seed: sort it."""
    return _HEADER_DEFAULT.sub(lambda m: m[1] + repr(_sorted(ast.literal_eval(m[2]))) + m[3], text)


def compile_all(out_dir: Path | str = COMPILED) -> list[Path]:
    """Compile every pipeline into ``out_dir``; returns the files written."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = compiled_path(name, out_dir)
        compiler.Compiler().compile(pipeline, str(path))
        path.write_text(_stable_header(path.read_text()))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=COMPILED, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in compile_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
