"""A temporary DVC project for the end-to-end tests: a git repo with this repository's dvc.yaml.

Built as a user would set one up (git init, dvc init, the dataset under ``data/synth`` added and pushed
to an S3 remote of the test stack), with a params.yaml the test writes. Commands run with the stack's
client environment and this venv's ``dvc``/``tfanet`` first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from components.stack import LocalStack

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


class DvcProject:
    """The project's root and the environment its stages run in."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    @classmethod
    def create(
        cls,
        root: Path,
        stack: LocalStack,
        params: dict[str, Any],
        data: Path,
        remote: str = "s3://dvc/store",
        env: dict[str, str] | None = None,
    ) -> DvcProject:
        """``data`` (an MVTec-layout root) becomes the project's ``data/synth``, tracked and pushed to ``remote``."""
        env = os.environ | stack.client_env() | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"} | (env or {})
        project = cls(root, env)
        project.run("git", "init", "-q")
        project.run(DVC, "init", "-q")
        project.run(DVC, "config", "core.analytics", "false")
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.copytree(data, root / "data" / "synth")
        project.run(DVC, "add", "-q", "data/synth")
        project.run(DVC, "remote", "add", "-d", "store", remote)
        project.run(DVC, "remote", "modify", "--local", "store", "endpointurl", stack.s3_endpoint or "")
        project.run(DVC, "remote", "modify", "--local", "store", "access_key_id", env["AWS_ACCESS_KEY_ID"])
        project.run(DVC, "remote", "modify", "--local", "store", "secret_access_key", env["AWS_SECRET_ACCESS_KEY"])
        project.run(DVC, "push", "-q")
        return project

    def run(self, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        """Run a command in the project; an exit code outside ``ok`` fails the test with the output's tail."""
        proc = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=1800)
        if proc.returncode not in ok:
            tail = proc.stdout[-4000:] + proc.stderr[-4000:]
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{tail}")
        return proc

    def repro(self, *targets: str) -> set[str]:
        """Run `dvc repro [targets]`; the stages that actually ran."""
        out = self.run(DVC, "repro", *targets).stdout
        return set(re.findall(r"^Running stage '([^']+)'", out, flags=re.M))

    def set_param(self, product: str, section: str, key: str, value: Any) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["products"][product][section][key] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def registry(self, product: str) -> dict[str, Any]:
        return json.loads((self.root / "runs" / product / "registry.json").read_text())

    def dataset_md5(self) -> str:
        """The DVC hash of ``data/synth``: the dataset version the remote stores."""
        return yaml.safe_load((self.root / "data" / "synth.dvc").read_text())["outs"][0]["md5"]
