"""infra/: every overlay renders, passes the Kubernetes 1.32 schemas and our policy; every Dockerfile passes hadolint.

The same checks as ``python infra/check.py`` (the CI gate), one test per overlay and Dockerfile, plus
tests that each rule rejects a bad example, so a check that silently passes everything would fail here.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("infra_check", ROOT / "infra" / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules["infra_check"] = check
_spec.loader.exec_module(check)

OVERLAYS = check.overlays()
DOCKERFILES = check.dockerfiles()
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: it renders the kustomize overlays"
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays")
    return {o.name: check.render(o) for o in OVERLAYS}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_the_expected_targets_exist() -> None:
    assert [o.name for o in OVERLAYS] == ["dev", "local", "prod"]
    assert [d.name for d in DOCKERFILES] == [
        "component-cuda.Dockerfile",
        "component.Dockerfile",
        "torchserve.Dockerfile",
    ]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_validates_and_follows_policy(overlay: Path) -> None:
    result = check.check_overlay(overlay)
    assert result.problems == []
    assert result.objects >= 15


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    assert check.check_dockerfile(dockerfile).problems == []


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    problems = "\n".join(check.check_dockerfile(bad).problems)
    assert "DL3007" in problems and "DL3013" in problems and "DL3042" in problems


def test_every_overlay_has_the_services_and_one_torchserve_per_product(rendered) -> None:
    for name, docs in rendered.items():
        deployments = _by_kind(docs, "Deployment")
        assert {"mlflow", "torchserve-fabric", "torchserve-bracket"} <= set(deployments), name
        assert set(_by_kind(docs, "StatefulSet")) == {"postgres"}, name
        services = _by_kind(docs, "Service")
        assert {"mlflow", "postgres", "torchserve-fabric", "torchserve-bracket"} <= set(services), name
        assert all(s["spec"]["type"] == "ClusterIP" for s in services.values()), name
        # Each product's Service selects only its own pods.
        for product in ("fabric", "bracket"):
            selector = services[f"torchserve-{product}"]["spec"]["selector"]
            pod_labels = deployments[f"torchserve-{product}"]["spec"]["template"]["metadata"]["labels"]
            assert selector["tfanet.io/product"] == product
            assert selector.items() <= pod_labels.items()
        assert _by_kind(docs, "Secret") == {}, name


def test_in_cluster_s3_only_outside_prod(rendered) -> None:
    assert "seaweedfs" in _by_kind(rendered["local"], "Deployment")
    assert "seaweedfs" in _by_kind(rendered["dev"], "Deployment")
    assert "seaweedfs" not in _by_kind(rendered["prod"], "Deployment")
    for name, docs in rendered.items():
        settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tfanet-s3-"))
        assert ("AWS_ENDPOINT_URL_S3" in settings["data"]) == (name != "prod"), name


def test_mlflow_server_settings(rendered) -> None:
    from mlflow.server.security_utils import is_allowed_host_header  # MLflow's own Host check

    for docs in rendered.values():
        mlflow = _by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]
        assert mlflow["command"] == ["mlflow", "server"]
        assert "--allowed-hosts=$(MLFLOW_ALLOWED_HOSTS)" in mlflow["args"]
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in mlflow["args"]
        env = {e["name"]: e for e in mlflow["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "tfanet-mlflow-db"
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
        assert mlflow["readinessProbe"]["httpGet"]["path"] == "/health"
        hosts = next(d for d in docs if d["metadata"]["name"].startswith("mlflow-settings"))["data"]
        allowed = hosts["MLFLOW_ALLOWED_HOSTS"].split(",")
        for host in ("mlflow:5000", "mlflow.tfanet.svc.cluster.local:5000", "mlflow.tfanet-dev.svc", "localhost:5000"):
            assert is_allowed_host_header(allowed, host), host
        for host in ("evil.example.com", "mlflow.evil.example.com:5000", "10.0.0.7:5000"):
            assert not is_allowed_host_header(allowed, host), host


def test_torchserve_config_keeps_token_auth_on(rendered) -> None:
    for name, docs in rendered.items():
        configs = [d for d in docs if d["kind"] == "ConfigMap" and "config.properties" in d.get("data", {})]
        assert len(configs) == 2, name  # one per product
        for cm in configs:
            props = dict(
                line.split("=", 1)
                for line in cm["data"]["config.properties"].splitlines()
                if "=" in line and line[0] != "#"
            )
            assert "disable_token_authorization" not in props
            assert props.get("enable_envvars_config", "false") == "false"
            assert props["enable_model_api"] == "true"
            assert props["inference_address"] == "http://0.0.0.0:8080"
            assert props["grpc_inference_address"] == "127.0.0.1"


def test_the_deploy_step_reaches_torchserve_through_the_gateway_and_may_restart_only_it(rendered) -> None:
    """The in-cluster deploy step (components/cluster_deploy.py) needs no TorchServe key and one narrow Role."""
    from components.cluster_deploy import PARITY_LABEL
    from components.inference_gateway import PORT

    for name, docs in rendered.items():
        for product in ("fabric", "bracket"):
            deployment = f"torchserve-{product}"
            pod = _by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
            gateway = next(c for c in pod["containers"] if c["name"] == "inference-gateway")
            assert gateway["command"][:3] == ["python", "-m", "components.inference_gateway"], name
            assert gateway["ports"] == [{"name": "gateway", "containerPort": PORT}]
            (work,) = gateway["volumeMounts"]
            assert work == {"name": "work", "mountPath": "/home/model-server/work", "readOnly": True}
            ports = {p["name"]: p["port"] for p in _by_kind(docs, "Service")[deployment]["spec"]["ports"]}
            assert ports["gateway"] == PORT
            rules = _by_kind(docs, "NetworkPolicy")[deployment]["spec"]["ingress"]
            (gateway_rule,) = (r for r in rules if {"port": PORT} in r["ports"])
            assert gateway_rule["ports"] == [{"port": PORT}]
            (peer,) = gateway_rule["from"]
            assert peer["podSelector"]["matchExpressions"] == [
                {"key": PARITY_LABEL, "operator": "In", "values": ["true"]}
            ]
            role = _by_kind(docs, "Role")[f"torchserve-rollout-{product}"]
            assert role["rules"] == [
                {
                    "apiGroups": ["apps"],
                    "resources": ["deployments"],
                    "resourceNames": [deployment],
                    "verbs": ["get", "patch"],
                }
            ]
            binding = _by_kind(docs, "RoleBinding")[f"torchserve-rollout-{product}"]
            assert binding["roleRef"]["name"] == role["metadata"]["name"]
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
            ]


def test_prod_scales_out(rendered) -> None:
    deployments = _by_kind(rendered["prod"], "Deployment")
    assert {n: deployments[n]["spec"]["replicas"] for n in ("mlflow", "torchserve-fabric", "torchserve-bracket")} == {
        "mlflow": 2,
        "torchserve-fabric": 2,
        "torchserve-bracket": 2,
    }
    assert _by_kind(rendered["local"], "Deployment")["mlflow"]["spec"]["replicas"] == 1


def test_every_referenced_secret_has_a_template_and_no_real_secret_is_tracked(rendered) -> None:
    referenced = {s for docs in rendered.values() for d in docs for s in check._secret_refs(d)}
    assert referenced == set(check.SECRETS)
    assert sorted(p.name for p in check.SECRETS_DIR.glob("*.example")) == sorted(check.SECRETS.values())
    tracked = subprocess.run(
        ["git", "ls-files", "--", str(check.SECRETS_DIR)], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    assert all(p.endswith((".example", ".gitignore")) for p in tracked)


def _broken(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    mlflow = _by_kind(docs, "Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    mlflow["image"] = "tfanet-component:latest"
    del mlflow["resources"]["limits"]["memory"]
    mlflow["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "undocumented", "key": "k"}}})
    _by_kind(docs, "Service")["mlflow"]["spec"]["type"] = "LoadBalancer"
    ts = next(d for d in docs if d["kind"] == "ConfigMap" and "config.properties" in d.get("data", {}))
    ts["data"]["config.properties"] += "disable_token_authorization=true\nenable_envvars_config=true\n"
    ts_deploy = _by_kind(docs, "Deployment")["torchserve-fabric"]["spec"]["template"]["spec"]["containers"][0]
    ts_deploy["args"] = ["--disable-token-auth"]
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "oops"}, "stringData": {"k": "v"}})
    return docs


def test_policy_rejects_each_broken_rule(rendered) -> None:
    problems = "\n".join(check.policy_problems(_broken(rendered["local"])))
    for expected in (
        "Secret/oops: a Secret is rendered",
        "Service/mlflow: type LoadBalancer",
        "disables TorchServe token authorization",
        "enable_envvars_config=true",
        "starts TorchServe with token authorization disabled",
        "image 'tfanet-component:latest' has no pinned tag",
        "resources.limits lacks memory",
        "references Secret 'undocumented'",
    ):
        assert expected in problems
    assert check.policy_problems(rendered["local"]) == []


def test_an_annotated_service_may_be_exposed(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    svc = _by_kind(docs, "Service")["torchserve-fabric"]
    svc["spec"]["type"] = "LoadBalancer"
    svc["metadata"].setdefault("annotations", {})[check.EXPOSE_ANNOTATION] = "factory line clients outside the cluster"
    assert check.policy_problems(docs) == []


def test_schema_validation_rejects_bad_objects(rendered) -> None:
    docs = copy.deepcopy(rendered["dev"])
    _by_kind(docs, "Deployment")["mlflow"]["spec"]["replicas"] = "two"
    _by_kind(docs, "Service")["mlflow"]["spec"]["portz"] = []  # strict: unknown fields fail
    docs.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    problems = "\n".join(check.schema_problems(docs))
    assert "Deployment/mlflow: spec.replicas: 'two' is not of type 'integer'" in problems
    assert "Service/mlflow" in problems and "portz" in problems
    assert "Widget/w: no schema" in problems


def test_image_pinning_rule() -> None:
    pinned = ["postgres:17.6-bookworm", "registry.example.com:5000/a/b:1.0", "x@sha256:" + "0" * 64]
    unpinned = ["postgres", "postgres:latest", "registry.example.com:5000/a/b"]
    assert all(check._image_pinned(i) for i in pinned)
    assert not any(check._image_pinned(i) for i in unpinned)


@needs_kubectl
def test_cli_exit_status() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "check.py")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   ") == len(OVERLAYS) + len(DOCKERFILES)


def test_torchserve_readiness_probe_sends_the_inference_key(tmp_path: Path) -> None:
    """ping.py against a stub that answers like TorchServe 0.12: 400 without the right key, else a status."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = {"value": "Healthy"}

    class Stub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/ping" and self.headers.get("Authorization") == "Bearer inf-key"
            body = json.dumps({"status": status["value"]} if ok else {"message": "Token Authorization failed"})
            self.send_response(200 if ok else 400)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ping"
    script = ROOT / "infra" / "k8s" / "torchserve" / "ping.py"

    def probe(key: str) -> int:
        keys = tmp_path / "key_file.json"
        keys.write_text(json.dumps({"inference": {"key": key}, "management": {"key": "m"}, "API": {"key": "a"}}))
        return subprocess.run([sys.executable, str(script), str(keys), url], capture_output=True).returncode

    try:
        assert probe("inf-key") == 0
        assert probe("wrong") != 0
        status["value"] = "Unhealthy"
        assert probe("inf-key") == 1
    finally:
        server.shutdown()
        server.server_close()


def test_torchserve_model_fetcher_reads_the_product_prefix(monkeypatch, tmp_path: Path, capsys) -> None:
    """fetch_models.py asks for s3://$MODEL_BUCKET/torchserve/$PRODUCT/ and tolerates an empty prefix."""
    import runpy

    import components.storage as storage

    calls = []

    def fake_download(client: object, bucket: str, prefix: str, local_dir: str, progress: bool) -> list[Path]:
        calls.append((bucket, prefix, local_dir, progress))
        if prefix.endswith("bracket"):
            raise FileNotFoundError(f"s3://{bucket}/{prefix}: no objects under this prefix")
        return [Path(local_dir) / "tfanet-fabric.mar"]

    monkeypatch.setattr(storage, "s3_client", lambda: object())
    monkeypatch.setattr(storage, "download_dir", fake_download)
    script = str(ROOT / "infra" / "k8s" / "torchserve" / "fetch_models.py")
    monkeypatch.setenv("MODEL_BUCKET", "tfanet-models")
    for product in ("fabric", "bracket"):
        monkeypatch.setenv("PRODUCT", product)
        monkeypatch.setattr(sys, "argv", [script, str(tmp_path)])
        runpy.run_path(script, run_name="__main__")
    assert calls == [
        ("tfanet-models", "torchserve/fabric", str(tmp_path), False),
        ("tfanet-models", "torchserve/bracket", str(tmp_path), False),
    ]
    out = capsys.readouterr().out
    assert "s3://tfanet-models/torchserve/fabric: 1 file(s)" in out
    assert "s3://tfanet-models/torchserve/bracket: 0 file(s)" in out
