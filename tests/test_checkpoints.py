"""Train in the cluster survives a kill: checkpoints mirrored per run, a retry resumes, a new run starts fresh.

The component-level test runs the kfp ``train`` component's body (what KFP's executor calls in the
pod) in a child process against the session's real SeaweedFS, kills it with SIGKILL (a preempted
node gives no more) once a checkpoint has reached S3, and runs it again with the same run id: the
model equals an uninterrupted run's, bit for bit. A new run id (the uninterrupted run, started while
the killed run's checkpoint is still in S3) restores nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from components.checkpoints import CheckpointMirror, checkpoint_location

REPO = Path(__file__).resolve().parents[1]
# Long enough that the kill lands mid-run on an idle machine too: the mirror uploads every 2 s, an epoch of the
# tiny profile on 30 images takes a fraction of a second.
EPOCHS = 40


def test_mirror_restores_uploads_what_changed_and_clears(tmp_path: Path) -> None:
    local, remote = tmp_path / "pod" / "checkpoints", tmp_path / "volume" / "run-1" / "fabric"
    with CheckpointMirror(local, str(remote), interval=60) as mirror:
        assert mirror.restored == []
        (local / "checkpoint.pt").write_bytes(b"epoch 1")
        (local / ".checkpoint.pt.123.tmp").write_bytes(b"half written")  # the loop's temporary file
        assert mirror.sync() == ["checkpoint.pt"] and mirror.sync() == []
        assert sorted(p.name for p in remote.iterdir()) == ["checkpoint.pt"]
        (local / "checkpoint.pt").write_bytes(b"epoch 2, longer")
        assert mirror.sync() == ["checkpoint.pt"]
    assert not remote.exists()  # the block succeeded: the durable copy is deleted

    with pytest.raises(RuntimeError), CheckpointMirror(local, str(remote), interval=60):
        (local / "checkpoint.pt").write_bytes(b"epoch 3")
        raise RuntimeError("preempted")
    assert (remote / "checkpoint.pt").read_bytes() == b"epoch 3"  # the last one is kept for the retry
    again = CheckpointMirror(tmp_path / "new-pod", str(remote))
    assert again.restore() == ["checkpoint.pt"] and (tmp_path / "new-pod" / "checkpoint.pt").read_bytes() == b"epoch 3"


def test_checkpoint_location_is_keyed_by_run_and_product() -> None:
    assert checkpoint_location("s3://b/checkpoints/", "run-1", "fabric") == "s3://b/checkpoints/run-1/fabric"
    with pytest.raises(ValueError, match="unresolved KFP placeholder"):
        checkpoint_location("s3://b/c", "{{$.pipeline_job_uuid}}", "fabric")
    with pytest.raises(ValueError, match="product must be a non-empty name"):
        checkpoint_location("s3://b/c", "run-1", "../fabric")


@pytest.fixture(scope="module")
def train_inputs(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The train component's input artifacts for synthetic fabric, made by the steps the pipeline runs before it."""
    from components import steps
    from components.kfp_io import ARTIFACT_CONTENTS

    section = yaml.safe_load((REPO / "params.yaml").read_text())["products"]["fabric"]
    section["train"] |= {"epochs": EPOCHS, "checkpoint_every": 1}
    root = tmp_path_factory.mktemp("train-inputs")
    paths = steps.ProductPaths(root / "tree")
    paths.root.mkdir()
    steps.prepare(synth_root, "fabric", section, paths)
    steps.features(synth_root, "fabric", section, paths)
    steps.template(synth_root, "fabric", section, paths)
    artifacts = {}
    for name in ("manifest", "features", "template"):
        for rel in ARTIFACT_CONTENTS[name]:
            target = root / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (paths.root / rel).is_dir() else shutil.copy2)(paths.root / rel, target)
        artifacts[name] = str(root / name)
    return {"params": json.dumps(section), "dataset_uri": str(synth_root), **artifacts}


# The component body as KFP's executor calls it in the pod: kfp artifacts in, kfp artifacts out.
TRAIN = """
import json, sys
from kfp.dsl import Artifact, Dataset, Metrics, Model
from components.kfp_components import train
a = json.loads(sys.argv[1])
model = Model(name="model", uri=a["model"])
train.python_func(
    product="fabric", dataset_uri=a["dataset_uri"], dataset_version="test", params=a["params"],
    s3_endpoint=a["s3_endpoint"], checkpoint_root=a["checkpoint_root"], run_id=a["run_id"],
    manifest=Dataset(uri=a["manifest"]), features=Dataset(uri=a["features"]), template=Artifact(uri=a["template"]),
    model=model, history=Metrics(uri=a["history"]),
)
print("METADATA " + json.dumps(model.metadata))
"""


def _start(args: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    Path(args["model"]).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, json.dumps(args)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    (line,) = (x for x in out.splitlines() if x.startswith("METADATA "))
    return json.loads(line[len("METADATA ") :])


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from tfanet_core.bundle import WEIGHTS_FILE

    return torch.load(model_dir / "model" / WEIGHTS_FILE, map_location="cpu", weights_only=True)


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_train_task_resumes_from_s3_and_equals_an_uninterrupted_run(
    local_stack, train_inputs: dict[str, Any], tmp_path: Path
) -> None:
    from components.storage import S3Settings, ensure_bucket, s3_client

    client_env = local_stack.client_env()
    s3 = s3_client(S3Settings.from_env(client_env))
    ensure_bucket(s3, "tfanet-models")
    root = f"s3://tfanet-models/checkpoints-test/{tmp_path.name}"
    env = {**os.environ, **client_env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    base = {**train_inputs, "s3_endpoint": client_env["AWS_ENDPOINT_URL_S3"], "checkpoint_root": root}

    def run(run_id: str, out: str) -> dict[str, Any]:
        return {**base, "run_id": run_id, "model": str(tmp_path / out / "model"), "history": str(tmp_path / out / "h")}

    # run A is preempted: SIGKILL once a checkpoint is in S3 (nothing of the pod survives but that)
    key = f"checkpoints-test/{tmp_path.name}/run-a/fabric/checkpoint.pt"
    killed = _start(run("run-a", "a1"), env)
    deadline = time.monotonic() + 600
    while not s3.list_objects_v2(Bucket="tfanet-models", Prefix=key).get("KeyCount"):
        assert killed.poll() is None, f"train ended before a checkpoint reached S3: {killed.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint reached S3 in 10 minutes"
        time.sleep(0.05)
    assert killed.poll() is None, "train finished before the kill: raise EPOCHS"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = torch.load(io.BytesIO(s3.get_object(Bucket="tfanet-models", Key=key)["Body"].read()), weights_only=True)
    assert 1 <= saved["epoch"] < EPOCHS

    # run B, a new run while A's checkpoint is still there: starts fresh, trains to the end, cleans up its own
    fresh = _finish(_start(run("run-b", "b"), env))
    assert fresh["restored_checkpoints"] == [] and fresh["checkpoints"] == f"{root}/run-b/fabric"
    assert s3.list_objects_v2(Bucket="tfanet-models", Prefix=key)["KeyCount"] == 1  # A's is untouched

    # run A retried (same run id, a new pod): resumes after the killed epoch and ends where B ended
    resumed = _finish(_start(run("run-a", "a2"), env))
    assert resumed["restored_checkpoints"] == ["checkpoint.pt"]
    history_a = json.loads((tmp_path / "a2" / "model" / "history.json").read_text())
    history_b = json.loads((tmp_path / "b" / "model" / "history.json").read_text())
    assert len(history_a) == EPOCHS and history_a == history_b
    weights_a, weights_b = _weights(tmp_path / "a2" / "model"), _weights(tmp_path / "b" / "model")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    left = s3.list_objects_v2(Bucket="tfanet-models", Prefix=f"checkpoints-test/{tmp_path.name}/")
    assert left["KeyCount"] == 0  # both runs succeeded: nothing left behind
