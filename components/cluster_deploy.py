"""The deploy step in the cluster: publish the champion's archive, roll TorchServe out, check parity, roll back.

The local deploy (:mod:`components.deploy`) registers a version through TorchServe's management API
and switches traffic only after parity. In the cluster the management key never leaves the TorchServe
pod, and the model store is an emptyDir filled from ``s3://<model_bucket>/torchserve/<product>/`` at
every pod start (infra/README.md). So :func:`deploy_in_cluster`:

1. publishes the champion's ``.mar`` (the archive builder of the local deploy, on the runtime the local
   deploy would choose, its export gated the same way; a failed gate refuses before anything changes) as
   the prefix's only archive (:func:`publish`);
2. restarts ``deployment/torchserve-<product>`` and waits until every replica is updated and ready
   (:class:`KubernetesRollout`: the Kubernetes API with the step pod's service-account token, RBAC in
   infra/k8s/torchserve/rollout-rbac.yaml);
3. scores the probe images through the pod's inference gateway (:mod:`components.inference_gateway`,
   no key needed, only pods labelled ``tfanet.io/torchserve-parity=true`` reach it) and compares them
   with the champion bundle's own scores (:func:`components.serving.parity.check_parity`);
4. parity holds: ``deployed``, the version joins the ``deploy.history`` tag. It does not: the previous
   deployed version is published again, rolled out and checked (``rolled_back``; ``champion`` moves
   back to it), or, with nothing deployed before, the archive is removed (``refused``, nothing served).

The decision is the local deploy's :class:`~components.deploy.DeployDecision`, tagged on the model
version (``deploy.status``, ``deploy.reason``, ``deploy.parity_max_abs_diff``, ...) and rendered as
Markdown for the KFP UI by :func:`markdown`. Between the rollout and the check (seconds) the new
version serves; a failed check limits that window, it does not avoid it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from components.deploy import (
    DEPLOYED,
    HISTORY_TAG,
    REFUSED,
    ROLLED_BACK,
    UNCHANGED,
    DeployDecision,
    DeployError,
    deploy_history,
)
from components.naming import registered_model_name, torchserve_model_name
from components.serving.archive import build_archive
from components.serving.parity import (
    DEFAULT_TOLERANCE,
    ParityReport,
    ServingRuntime,
    check_parity,
    export_for_serving,
)
from components.serving.torchserve import TorchServeClient, TorchServeError
from components.tracking import CHAMPION, download_bundle, version_by_alias
from tfanet_core.errors import TfanetError
from tfanet_core.runtimes import threads_per_worker

__all__ = [
    "PARITY_LABEL",
    "KubernetesRollout",
    "deploy_in_cluster",
    "gateway_url",
    "markdown",
    "publish",
    "unpublish",
]

PARITY_LABEL = "tfanet.io/torchserve-parity"  # pods with this label "true" may reach the inference gateway


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def gateway_url(product: str, namespace: str) -> str:
    """The inference gateway of ``torchserve-<product>`` (infra/k8s/torchserve: Service port ``gateway``)."""
    from components.inference_gateway import PORT

    return f"http://torchserve-{product}.{namespace}.svc.cluster.local:{PORT}"


def _prefix(product: str) -> str:
    return f"torchserve/{product}"


def _archives(s3: Any, bucket: str, product: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{_prefix(product)}/").get("Contents", [])
    return [o["Key"] for o in listed if o["Key"].endswith(".mar")]


def publish(
    product: str, version: str, model_bucket: str, s3: Any, registry: MlflowClient, probes: Sequence[Path]
) -> dict[str, Any]:
    """Make the ``.mar`` of registry version ``version`` the only archive of ``product`` in the model bucket.

    The archive serves the runtime :func:`~components.serving.parity.export_for_serving` decides (the
    bundle's ``serving.runtime``, else the fastest in parity, timed here, in the deploy step's pod, at
    TorchServe's default batch of 1) with its gated export. The prefix is
    ``s3://<model_bucket>/torchserve/<product>/``. Returns ``{"archive": s3 URI, "removed": [s3 URIs],
    "runtime": ServingRuntime}``; the version is tagged ``deploy.published``. The registry keeps every
    version, so removing old archives loses nothing. When the export the bundle names fails its gate,
    nothing is published or removed: ``archive`` is None and ``runtime.failure`` says why.
    """
    reg_name = registered_model_name(product)
    mv = registry.get_model_version(reg_name, version)
    key = f"{_prefix(product)}/{torchserve_model_name(product)}-v{version}.mar"
    with tempfile.TemporaryDirectory(prefix=f"publish-{product}-") as tmp:
        bundle = download_bundle(f"models:/{reg_name}/{version}", Path(tmp) / "model")
        runtime = export_for_serving(bundle, mv.run_id, Path(tmp) / "export", probes, threads=threads_per_worker(1))
        if runtime.failure is not None:
            return {"archive": None, "removed": [], "runtime": runtime}
        source = {"kind": "mlflow", "model": reg_name, "version": version, "run_id": mv.run_id}
        mar = build_archive(
            bundle, product, version, Path(tmp) / "store", source=source, filename=Path(key).name, export=runtime.export
        )
        s3.upload_file(str(mar), model_bucket, key)
    removed = [k for k in _archives(s3, model_bucket, product) if k != key]
    for old in removed:
        s3.delete_object(Bucket=model_bucket, Key=old)
    archive = f"s3://{model_bucket}/{key}"
    registry.set_model_version_tag(reg_name, version, "deploy.published", archive)
    return {"archive": archive, "removed": [f"s3://{model_bucket}/{k}" for k in removed], "runtime": runtime}


def unpublish(product: str, model_bucket: str, s3: Any) -> list[str]:
    """Remove every archive of ``product`` from the model bucket (its TorchServe then starts with no model)."""
    keys = _archives(s3, model_bucket, product)
    for key in keys:
        s3.delete_object(Bucket=model_bucket, Key=key)
    return [f"s3://{model_bucket}/{k}" for k in keys]


class KubernetesRollout:
    """``kubectl rollout restart`` + ``rollout status`` of ``deployment/torchserve-<product>``, from inside a pod.

    Talks to the API server with the pod's service-account token (standard library only). The
    account needs ``get``/``patch`` on those Deployments (infra/k8s/torchserve/rollout-rbac.yaml).
    """

    ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    def __init__(self, namespace: str, timeout_s: float = 900.0, poll_s: float = 5.0) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = self.ACCOUNT / "token"
        if not host or not token.is_file():
            raise DeployError(
                f"not in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or {token}): run `kubectl -n {self.namespace} "
                "rollout restart deployment/torchserve-<product>` yourself, or run this step in the cluster"
            )
        headers = {"Authorization": f"Bearer {token.read_text().strip()}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/strategic-merge-patch+json"
        request = urllib.request.Request(f"https://{host}:{port}{path}", data=data, method=method, headers=headers)
        context = ssl.create_default_context(cafile=str(self.ACCOUNT / "ca.crt"))
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise DeployError(
                f"Kubernetes API {method} {path} answered {exc.code}: {exc.read()[:300].decode('utf-8', 'replace')}"
                " (RBAC: infra/k8s/torchserve/rollout-rbac.yaml binds the pipeline's service account)"
            ) from exc

    def __call__(self, product: str) -> None:
        """Restart the product's TorchServe and wait until every replica runs the new pod template and is ready."""
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/torchserve-{product}"
        patch = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": _now()}}}}}
        generation = self._call("PATCH", path, patch)["metadata"]["generation"]
        deadline = time.monotonic() + self.timeout_s
        while True:
            deployment = self._call("GET", path)
            status, want = deployment.get("status", {}), deployment["spec"].get("replicas", 1)
            counts = [status.get(k, 0) for k in ("updatedReplicas", "replicas", "readyReplicas", "availableReplicas")]
            if status.get("observedGeneration", 0) >= generation and counts == [want] * 4:
                return
            for condition in status.get("conditions", []):
                if condition.get("reason") == "ProgressDeadlineExceeded":
                    raise DeployError(f"rollout of torchserve-{product} stalled: {condition.get('message')}")
            if time.monotonic() > deadline:
                raise DeployError(f"rollout of torchserve-{product} not done after {self.timeout_s:g} s: {status}")
            time.sleep(self.poll_s)


def _parity(
    inference_url: str, product: str, version: str, bundle: Path, probes: Sequence[Path], tolerance: float
) -> tuple[float | None, str | None]:
    """(max |served - bundle|, failure reason or None) of ``version`` as the gateway serves it."""
    client = TorchServeClient(inference_url, inference_url, key_file=None)
    try:
        report: ParityReport = check_parity(
            client, torchserve_model_name(product), bundle, probes, version=version, tolerance=tolerance
        )
    except TorchServeError as exc:
        return None, f"v{version} is not served after the rollout ({exc})"
    if report.passed:
        return report.max_abs_diff, None
    worst = max(report.rows, key=lambda r: float(r["abs_diff"]))
    return report.max_abs_diff, (
        f"parity failed: served scores of v{version} differ from its bundle's by up to {report.max_abs_diff:.3g} "
        f"(> {tolerance:g}; worst probe {Path(str(worst['path'])).name}: served {float(worst['served_score']):.6g}, "
        f"bundle {float(worst['bundle_score']):.6g})"
    )


def deploy_in_cluster(
    product: str,
    *,
    model_bucket: str,
    s3: Any,
    probes: Sequence[Path | str],
    restart: Callable[[str], None],
    inference_url: str,
    tolerance: float = DEFAULT_TOLERANCE,
    tracking_uri: str | None = None,
) -> DeployDecision:
    """Serve the registry's champion of ``product`` in the cluster if its served scores equal its bundle's.

    ``s3``: a boto3 client for the model bucket; ``restart(product)`` rolls TorchServe out and returns
    when the new pods are ready (:class:`KubernetesRollout` in the cluster); ``inference_url``: the
    pod's inference gateway (:func:`gateway_url`).
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    paths = [Path(p) for p in probes]
    if not paths:
        raise TfanetError("the cluster deploy needs at least one probe image (a normal and a defective one are best)")
    registry = MlflowClient()
    reg_name = registered_model_name(product)
    name = torchserve_model_name(product)
    champion = version_by_alias(registry, reg_name, CHAMPION)
    history = deploy_history(registry, reg_name)
    previous = history[-1] if history else None

    def decide(status: str, reason: str, serving: str | None, **extra: Any) -> DeployDecision:
        now = version_by_alias(registry, reg_name, CHAMPION)  # moved back by a rollback
        champion_now = now.version if now else None
        return DeployDecision(
            product,
            name,
            status,
            reason,
            champion_now,
            previous,
            serving,
            **extra,
            history=tuple(history),
            decided_at=_now(),
        )

    if champion is None:
        return decide(UNCHANGED, f"{reg_name} has no champion yet (register and promote a version first)", previous)
    version = str(champion.version)
    if version == previous:
        return decide(UNCHANGED, f"champion v{version} already is the deployed version", previous)

    published = publish(product, version, model_bucket, s3, registry, paths)
    runtime: ServingRuntime = published["runtime"]
    recorded = {**runtime.record(), "archive": published["archive"]}
    tags = {"deploy.decided_at": _now(), **runtime.tags()}
    if runtime.failure is not None:
        where = f"v{previous} keeps serving" if previous else "nothing is served"
        reason = f"export gate failed for v{version}: {runtime.failure}; {where}"
        _set_tags(registry, reg_name, version, {**tags, "deploy.status": REFUSED, "deploy.reason": reason})
        return decide(REFUSED, reason, previous, **recorded)
    restart(product)
    with tempfile.TemporaryDirectory(prefix=f"parity-{product}-") as tmp:
        bundle = download_bundle(f"models:/{reg_name}/{version}", Path(tmp) / "model")
        diff, failure = _parity(inference_url, product, version, bundle, paths, tolerance)
    tags["deploy.archive"] = published["archive"]
    if diff is not None:
        tags["deploy.parity_max_abs_diff"] = f"{diff:.3g}"
    if failure is None:
        history.append(version)
        registry.set_registered_model_tag(reg_name, HISTORY_TAG, ",".join(history))
        reason = f"champion v{version} passed parity in the cluster (max |diff| {diff:.2g} <= {tolerance:g}), " + (
            f"replacing v{previous}" if previous else "the first version served"
        )
        _set_tags(registry, reg_name, version, {**tags, "deploy.status": DEPLOYED, "deploy.reason": reason})
        return decide(DEPLOYED, reason, version, parity_max_abs_diff=diff, **recorded)

    if previous is None:
        unpublish(product, model_bucket, s3)
        restart(product)
        reason = f"{failure}; archive removed, nothing is served"
        _set_tags(registry, reg_name, version, {**tags, "deploy.status": REFUSED, "deploy.reason": reason})
        return decide(REFUSED, reason, None, parity_max_abs_diff=diff, **recorded)

    back = publish(product, previous, model_bucket, s3, registry, paths)
    if back["archive"] is None:
        raise DeployError(f"{failure}; the rollback to v{previous} failed too: {back['runtime'].failure}")
    restart(product)
    with tempfile.TemporaryDirectory(prefix=f"parity-{product}-") as tmp:
        bundle = download_bundle(f"models:/{reg_name}/{previous}", Path(tmp) / "model")
        _, back_failure = _parity(inference_url, product, previous, bundle, paths, tolerance)
    if back_failure is not None:
        raise DeployError(f"{failure}; the rollback to v{previous} failed too: {back_failure}")
    registry.set_registered_model_alias(reg_name, CHAMPION, previous)
    reason = f"{failure}; rolled back to v{previous} ({back['archive']}), champion moved back to it"
    _set_tags(registry, reg_name, version, {**tags, "deploy.status": ROLLED_BACK, "deploy.reason": reason})
    return decide(ROLLED_BACK, reason, previous, parity_max_abs_diff=diff, **recorded)


def _set_tags(registry: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        registry.set_model_version_tag(name, version, key, value)


def markdown(decision: DeployDecision) -> str:
    """The decision as the deploy step's Markdown output (KFP UI)."""
    lines = [
        f"## {decision.model_name}: {decision.status}",
        "",
        decision.reason,
        "",
        f"- serving: {f'v{decision.serving}' if decision.serving else 'nothing'}; "
        f"before: {f'v{decision.previous_default}' if decision.previous_default else 'nothing'}",
        f"- registry champion: {f'v{decision.champion}' if decision.champion else 'none'}",
    ]
    if decision.parity_max_abs_diff is not None:
        lines.append(f"- parity: max |served - bundle| score {decision.parity_max_abs_diff:.3g}")
    if decision.runtime:
        speeds = ", ".join(f"{k} {v:.1f}" for k, v in decision.runtime["images_per_s"].items())
        how = f"measured, images/s: {speeds}" if speeds else "the bundle's serving config"
        lines.append(f"- runtime: {decision.runtime['runtime']} ({how})")
    if decision.archive:
        lines.append(f"- archive: `{decision.archive}`")
    lines.append(f"- deploy history: {', '.join(f'v{v}' for v in decision.history) or 'empty'}")
    return "\n".join(lines) + "\n"
