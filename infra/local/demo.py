"""``make demo``: the whole chain on this machine, from a fresh clone, with progress at every step.

Steps (each prints what it does and how long it took): start the local stack (SeaweedFS S3 +
MLflow on 127.0.0.1) and TorchServe (loopback, token auth on, state in ``.tfanet/torchserve``) →
make this repository a DVC project with the S3 remote ``store`` at the stack's endpoint → generate
the synthetic dataset ``data/synth`` if absent, ``dvc add`` and ``dvc push`` it → ``dvc repro``
(prepare … register → deploy, per product of params.yaml) → send one good and one defective test
image of each product to its TorchServe endpoint and print both responses → print the MLflow UI
address and each product's metrics, promotion and deploy decisions.

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

from components.naming import torchserve_model_name
from components.serving import server as torchserve
from components.serving.torchserve import TorchServeClient
from components.stack import LocalStack

ROOT = Path.cwd()
BIN = Path(sys.executable).parent
REMOTE = "store"
REMOTE_URL = "s3://dvc/store"
TORCHSERVE_DIR = Path(os.environ.get("TFANET_TORCHSERVE_DIR", ".tfanet/torchserve"))
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
}


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
        self.torchserve: TorchServeClient  # by start_torchserve
        self.params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def start_stack(self) -> None:
        self.stack.start()
        self.env = os.environ | self.stack.client_env() | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        print(f"    S3 {self.stack.s3_endpoint}   MLflow {self.stack.tracking_uri}   state {self.stack.state_dir}")

    def start_torchserve(self) -> None:
        """Reuse a healthy server from an earlier demo; otherwise start one on free loopback ports."""
        state = torchserve.status(TORCHSERVE_DIR)
        if not (state.get("running") and state.get("healthy")):
            if state.get("running"):
                torchserve.stop(TORCHSERVE_DIR)
            torchserve.start(TORCHSERVE_DIR, torchserve.free_ports())
        self.env["TFANET_TORCHSERVE_DIR"] = str(TORCHSERVE_DIR.resolve())
        self.torchserve = TorchServeClient.from_state_dir(TORCHSERVE_DIR)
        print(f"    TorchServe {self.torchserve.inference} (management {self.torchserve.management}), token auth on")

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
            products = generate(root, seed=int(data.get("synth_seed", 0)), n_train=int(data.get("synth_train", 40)))
            print(f"    generated {root}: products {', '.join(products)}")
        _dvc("add", "-q", data["root"])
        _dvc("push", "-q", env=self.env)
        print(f"    tracked by {data['root']}.dvc, pushed to {REMOTE_URL} at {self.stack.s3_endpoint}")

    def repro(self) -> None:
        _dvc("repro", env=self.env)
        # DVC cannot see TorchServe's state: a server started since the last deploy serves nothing yet.
        for product in self.params["products"]:
            record = json.loads((ROOT / "runs" / product / "deploy.json").read_text())
            if record["serving"] and torchserve_model_name(product) not in self.torchserve.models():
                print(f"    TorchServe was restarted since {product} was deployed: deploying its champion again")
                _dvc("repro", "-f", "-s", f"deploy@{product}", env=self.env)

    def send_images(self) -> None:
        """What a line camera does: POST image bytes, get a verdict back; says plainly when a verdict is wrong."""
        from tfanet_core.data.manifest import Manifest

        data_root = ROOT / self.params["data"]["root"]
        wrong = []
        for product in self.params["products"]:
            test = Manifest.read(ROOT / "runs" / product / "manifest.csv", data_root).samples("test")
            good = next(s for s in test if not s.is_anomalous)
            bad = next(s for s in test if s.is_anomalous)
            for label, sample in (("good", good), ("defective", bad)):
                resp = self.torchserve.predict(
                    torchserve_model_name(product),
                    sample.path.read_bytes(),
                    content_type=IMAGE_TYPES[sample.path.suffix],
                )
                if resp.status != 200:
                    raise SystemExit(f"demo: TorchServe answered {resp.status} for {sample.path}: {resp.message}")
                answer = resp.json()
                verdict = "FLAGGED" if answer["is_anomalous"] else "passed"
                if answer["is_anomalous"] != sample.is_anomalous:
                    wrong.append(f"{product} {label} image {sample.path.name} {verdict}")
                rel = sample.path.relative_to(ROOT)
                print(f"    {product} {label:<9} {rel}: {verdict}\n      -> {json.dumps(answer)}")
        if wrong:
            print(f"    WRONG VERDICTS: {'; '.join(wrong)}: the demo model is not good enough on these images")

    def summary(self) -> None:
        print(f"\n{'product':<10} {'image_auroc':>11} {'pixel_auroc':>11} {'aupro':>7} {'f1_max':>7}  registry  served")
        for product in self.params["products"]:
            run = ROOT / "runs" / product
            m = json.loads((run / "metrics.json").read_text())
            r = json.loads((run / "registry.json").read_text())
            d = json.loads((run / "deploy.json").read_text())
            cells = " ".join(
                f"{m.get(k) if m.get(k) is None else f'{m[k]:.3f}':>{w}}"
                for k, w in (("image_auroc", 11), ("pixel_auroc", 11), ("aupro", 7), ("f1_max", 7))
            )
            served = f"v{d['serving']} ({d['status']})" if d["serving"] else f"nothing ({d['status']})"
            print(f"{product:<10} {cells}  {r['registered_model']} v{r['version']} {r['decision']}  {served}")
        print(
            f"\nMLflow UI: {self.stack.tracking_uri}  (experiments tfanet-<product>: compare runs; "
            f"Models: versions and the champion alias)"
        )
        print(
            "More: dvc metrics show | dvc params diff | dvc plots show | dvc exp run -S products.fabric.train.lr=5e-4"
        )
        print("Endpoint (README 'Calling the endpoint'; the Content-Type header is needed, see there):")
        key_file = TORCHSERVE_DIR / "key_file.json"
        print(f"  {curl_command(self.torchserve.inference, key_file, 'fabric', 'image.png')}")
        print("Stop the servers: make stop")


def curl_command(inference_url: str, key_file: Path, product: str, image: str) -> str:
    """A curl line that works when pasted: the inference key read from the state dir, the image's Content-Type.

    Without ``Content-Type`` curl sends ``--data-binary`` as a form (application/x-www-form-urlencoded) and
    TorchServe's front end fails on it with HTTP 500 before the model's handler runs.
    """
    key = f'python3 -c \'import json; print(json.load(open("{key_file}"))["inference"]["key"])\''
    return (
        f'curl -H "Authorization: Bearer $({key})" -H "Content-Type: image/png" '
        f"--data-binary @{image} {inference_url}/predictions/{torchserve_model_name(product)}"
    )


def main() -> int:
    if not (ROOT / "dvc.yaml").is_file():
        raise SystemExit("demo: run from the repository root (where dvc.yaml is): make demo")
    demo = Demo()
    steps: list[tuple[str, Callable[[], None]]] = [
        (
            "start the local stack: SeaweedFS S3 + MLflow on 127.0.0.1 (MLflow takes 20-50 s on first start)",
            demo.start_stack,
        ),
        ("start TorchServe on 127.0.0.1 (token auth on)", demo.start_torchserve),
        ("DVC project and its S3 remote", demo.dvc_project),
        ("synthetic dataset, versioned by DVC", demo.dataset),
        (
            "dvc repro: prepare → validate → features → template → train → evaluate → calibrate → register → deploy",
            demo.repro,
        ),
        ("send one good and one defective image of each product to TorchServe", demo.send_images),
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
