"""``make demo``: the whole chain on this machine, from a fresh clone, with progress at every step.

Steps (each prints what it does and how long it took): start the local stack (SeaweedFS S3 +
MLflow on 127.0.0.1) → make this repository a DVC project with the S3 remote ``store`` at the
stack's endpoint → generate the synthetic dataset ``data/synth`` if absent, ``dvc add`` and
``dvc push`` it → ``dvc repro`` (prepare … register, per product of params.yaml) → print the
MLflow UI address and each product's metrics and promotion decision. The deploy stage
(TorchServe) arrives as the last stage of dvc.yaml; its "send one good and one defective image"
check goes into :data:`STEPS` after ``repro``.

Run from the repository root: ``python -m infra.local.demo`` (``make demo`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from components.stack import LocalStack

ROOT = Path.cwd()
BIN = Path(sys.executable).parent
REMOTE = "store"
REMOTE_URL = "s3://dvc/store"


def _dvc(*args: str, env: dict[str, str] | None = None, quiet: bool = False) -> str:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE if quiet else None,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"demo: `dvc {' '.join(args)}` failed (exit {proc.returncode}); see its output above")
    return proc.stdout or ""


class Demo:
    def __init__(self) -> None:
        self.stack = LocalStack()
        self.env: dict[str, str] = {}
        self.params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def start_stack(self) -> None:
        self.stack.start()
        self.env = os.environ | self.stack.client_env() | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        print(f"    S3 {self.stack.s3_endpoint}   MLflow {self.stack.tracking_uri}   state {self.stack.state_dir}")

    def dvc_project(self) -> None:
        if not (ROOT / ".dvc").is_dir():
            _dvc("init", "-q")
        _dvc("config", "core.analytics", "false")
        if REMOTE not in _dvc("remote", "list", quiet=True).split():
            _dvc("remote", "add", "-d", REMOTE, REMOTE_URL)
        # Machine-specific (port, generated secret): .dvc/config.local, which git never sees.
        _dvc("remote", "modify", "--local", REMOTE, "endpointurl", self.stack.s3_endpoint or "")
        _dvc("remote", "modify", "--local", REMOTE, "access_key_id", self.env["AWS_ACCESS_KEY_ID"])
        _dvc("remote", "modify", "--local", REMOTE, "secret_access_key", self.env["AWS_SECRET_ACCESS_KEY"])

    def dataset(self) -> None:
        from tfanet_core.data.synth import generate

        data = self.params["data"]
        root = ROOT / data["root"]
        if root.is_dir():
            print(f"    {root} exists: kept (delete it to regenerate)")
        else:
            products = generate(root, seed=int(data.get("synth_seed", 0)))
            print(f"    generated {root}: products {', '.join(products)}")
        _dvc("add", "-q", data["root"])
        _dvc("push", "-q", env=self.env)
        print(f"    tracked by {data['root']}.dvc, pushed to {REMOTE_URL} at {self.stack.s3_endpoint}")

    def repro(self) -> None:
        _dvc("repro", env=self.env)

    def summary(self) -> None:
        print(f"\n{'product':<10} {'image_auroc':>11} {'pixel_auroc':>11} {'aupro':>7} {'f1_max':>7}  registry")
        for product in self.params["products"]:
            run = ROOT / "runs" / product
            m = json.loads((run / "metrics.json").read_text())
            r = json.loads((run / "registry.json").read_text())
            cells = " ".join(
                f"{m.get(k) if m.get(k) is None else f'{m[k]:.3f}':>{w}}"
                for k, w in (("image_auroc", 11), ("pixel_auroc", 11), ("aupro", 7), ("f1_max", 7))
            )
            print(f"{product:<10} {cells}  {r['registered_model']} v{r['version']} {r['decision']}")
        print(
            f"\nMLflow UI: {self.stack.tracking_uri}  (experiments tfanet-<product>: compare runs; "
            f"Models: versions and the champion alias)"
        )
        print(
            "More: dvc metrics show | dvc params diff | dvc plots show | dvc exp run -S products.fabric.train.lr=5e-4"
        )
        print("Stop the servers: make stop")


def main() -> int:
    if not (ROOT / "dvc.yaml").is_file():
        raise SystemExit("demo: run from the repository root (where dvc.yaml is): make demo")
    demo = Demo()
    steps: list[tuple[str, Callable[[], None]]] = [
        (
            "start the local stack: SeaweedFS S3 + MLflow on 127.0.0.1 (MLflow takes 20-50 s on first start)",
            demo.start_stack,
        ),
        ("DVC project and its S3 remote", demo.dvc_project),
        ("synthetic dataset, versioned by DVC", demo.dataset),
        ("dvc repro: prepare → validate → features → template → train → evaluate → calibrate → register", demo.repro),
        ("summary", demo.summary),
    ]
    started = time.perf_counter()
    for i, (title, step) in enumerate(steps, 1):
        print(f"\n==> [{i}/{len(steps)}] {title}", flush=True)
        t0 = time.perf_counter()
        step()
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
