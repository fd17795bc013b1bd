"""The local stack: ports, process-group stops, loopback-only servers, idempotent start, the CLI, S3 via boto3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from mlflow import MlflowClient

from components import supervisor
from components.serving import server
from components.stack import GRPC_OFFSET, LocalStack, StackError, _PortPicker, main
from components.storage import S3Settings, download_dir, ensure_bucket, parse_s3_uri, s3_client, upload_dir
from tfanet_core.errors import TfanetError

REPO = Path(__file__).resolve().parents[1]


def _sleeper_group() -> subprocess.Popen[bytes]:
    """A process group of a shell and a grandchild, like mlflow + uvicorn: both must die on stop."""
    return subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)


def _fake_state(state_dir: Path, proc: subprocess.Popen[bytes], start_time: int | None) -> LocalStack:
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {"ports": {"s3": 1}, "processes": {"s3": {"pid": proc.pid, "start_time": start_time, "s3_port": 1}}}
    (state_dir / "stack.json").write_text(json.dumps(state))
    return LocalStack(state_dir)


def _listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by ``pids``, from /proc (no ss/psutil needed)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                hex_ip, hex_port = local.split(":")
                ip = (
                    socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_ip)[::-1])
                    if len(hex_ip) == 8
                    else f"v6:{hex_ip}"
                )
                found.add((ip, int(hex_port, 16)))
    return found


def _descendants(pid: int) -> set[int]:
    out = {pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out |= _descendants(int(entry.name))
    return out


# --------------------------------------------------------------------------- no servers
def test_port_pair_is_free_and_offset() -> None:
    picker = _PortPicker()
    try:
        a, b = picker.pair(None)
        c, d = picker.pair(None)
        assert b == a + GRPC_OFFSET and d == c + GRPC_OFFSET
        assert len({a, b, c, d}) == 4
    finally:
        picker.release()


def test_pinned_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = LocalStack(tmp_path, mlflow_port=port)
        with pytest.raises(StackError, match=f"port {port} on 127.0.0.1 is in use"):
            stack._allocate("mlflow", {"ports": {}, "processes": {}})


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    proc = _sleeper_group()
    try:
        assert _wait_for(lambda: len(supervisor.group_members(proc.pid)) == 2)
        stack = _fake_state(tmp_path, proc, supervisor.start_time(proc.pid))
        assert stack.stop(timeout=5) == ["s3"]
        proc.wait(timeout=5)
        assert supervisor.group_members(proc.pid) == []
        assert stack.load_state()["processes"] == {}
    finally:
        _kill(proc)


def test_stop_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    """The stack and TorchServe share one guard: a recorded PID now held by another process is left alone."""
    proc = _sleeper_group()
    try:
        recycled = supervisor.Supervised(proc.pid, (supervisor.start_time(proc.pid) or 0) + 1)  # same PID, other
        assert supervisor.recycled(recycled) and not supervisor.running(recycled)
        assert supervisor.stop(recycled, "stranger", timeout=1) is False
        stack = _fake_state(tmp_path / "stack", proc, recycled.start_time)
        assert stack.stop(timeout=1) == []
        assert stack.load_state()["processes"] == {}
        ts = tmp_path / "torchserve"
        ts.mkdir()
        info = server.ServerInfo(str(ts), "http://i", "http://m", "http://x", str(ts / "k"), proc.pid, proc.pid, 1)
        (ts / server.SERVER_FILE).write_text(json.dumps(info.__dict__))
        assert server.status(ts)["running"] is False
        assert server.stop(ts, timeout=1) is False and not (ts / server.SERVER_FILE).exists()
        assert proc.poll() is None, "a process that is not ours was signalled"
    finally:
        _kill(proc)


def test_status_and_env_of_a_stack_never_started(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = LocalStack(tmp_path / "none")
    assert {s.name: (s.running, s.healthy, s.url) for s in stack.status().values()} == {
        "s3": (False, False, None),
        "mlflow": (False, False, None),
    }
    with pytest.raises(StackError, match="start it first"):
        stack.client_env()
    assert main(["status", "--state-dir", str(tmp_path / "none")]) == 1
    assert main(["stop", "--state-dir", str(tmp_path / "none")]) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_s3_settings_from_env() -> None:
    env = {"MLFLOW_S3_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2", "AWS_ACCESS_KEY_ID": "k"}
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.access_key_id, s.secret_access_key, s.region) == ("http://b:2", "k", None, "us-east-1")
    assert S3Settings.from_env({}).endpoint_url is None
    assert parse_s3_uri("s3://dvc/store/x/") == ("dvc", "store/x")
    with pytest.raises(ValueError, match="not an S3 URI"):
        parse_s3_uri("/local/path")


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return supervisor.wait(predicate, timeout, interval=0.05)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if supervisor.group_members(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


# --------------------------------------------------------------------------- real servers
@pytest.mark.server
def test_session_stack_is_healthy_and_loopback_only(local_stack: LocalStack) -> None:
    status = local_stack.status()
    assert all(s.running and s.healthy for s in status.values()), status
    pids = set().union(*(_descendants(s.pid) for s in status.values() if s.pid))
    addresses = _listening_addresses(pids)
    ports = local_stack.load_state()["ports"]
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses
    assert {p for _, p in addresses} == set(ports.values())  # every port is one we chose, none is a default


@pytest.mark.server
def test_second_start_is_a_no_op(local_stack: LocalStack) -> None:
    before = {name: s.pid for name, s in local_stack.status().items()}
    again = LocalStack(local_stack.state_dir).start(timeout=30)
    assert {name: s.pid for name, s in again.items()} == before
    assert all(s.healthy for s in again.values())


@pytest.mark.server
def test_boto3_directory_round_trip(local_stack: LocalStack, tmp_path: Path) -> None:
    env = local_stack.client_env()
    client = s3_client(S3Settings.from_env(env))
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} >= {"mlflow", "dvc"}
    assert ensure_bucket(client, "dvc") is False
    assert ensure_bucket(client, "scratch") is True
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(bytes(range(256)) * 100)
    keys = upload_dir(client, src, "scratch", "runs/1/", progress=False)
    assert sorted(keys) == ["runs/1/a/b/deep.bin", "runs/1/top.txt"]
    files = download_dir(client, "scratch", "runs/1", tmp_path / "dst", progress=False)
    assert sorted(f.relative_to(tmp_path / "dst").as_posix() for f in files) == ["a/b/deep.bin", "top.txt"]
    assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == bytes(range(256)) * 100
    with pytest.raises(TfanetError, match="no objects"):
        download_dir(client, "scratch", "runs/2", tmp_path / "none", progress=False)
    wrong = s3_client(S3Settings(env["AWS_ENDPOINT_URL_S3"], "tfanet", "not-the-secret"))
    with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
        wrong.list_buckets()


@pytest.mark.server
def test_cli_start_stop_restart_keeps_ports_and_data(tmp_path: Path) -> None:
    """The commands a user types: start detaches, a second start is a no-op, stop ends every process,
    and a restart comes back on the same URLs with the experiments and objects of before."""
    state = tmp_path / "stack"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.local.stack", *args, "--state-dir", str(state)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )

    def status() -> dict[str, dict[str, object]]:
        return json.loads(cli("status", "--json").stdout)

    started = cli("start", "--timeout", "300")
    try:
        assert started.returncode == 0, started.stderr
        first = status()
        assert all(s["healthy"] for s in first.values()), first
        pids = {int(s["pid"]) for s in first.values()}  # type: ignore[call-overload]
        assert all(supervisor.group_members(pid) for pid in pids)  # the servers outlived the CLI process
        assert "started" not in cli("start").stderr  # nothing was started again
        env = dict(line.removeprefix("export ").split("=", 1) for line in cli("env").stdout.splitlines())
        assert env["MLFLOW_TRACKING_URI"] == first["mlflow"]["url"]
        assert env["AWS_ENDPOINT_URL_S3"] == first["s3"]["url"]
        MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("survives-restart")
        s3_client(S3Settings.from_env(env)).put_object(Bucket="dvc", Key="k", Body=b"kept")
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped: mlflow, s3" in stopped.stdout
    assert all(not supervisor.group_members(pid) for pid in pids)
    assert cli("status").returncode == 1

    try:
        assert cli("start", "--timeout", "300").returncode == 0
        again = status()
        assert {k: s["url"] for k, s in again.items()} == {k: s["url"] for k, s in first.items()}
        assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("survives-restart") is not None
        assert s3_client(S3Settings.from_env(env)).get_object(Bucket="dvc", Key="k")["Body"].read() == b"kept"
    finally:
        assert cli("stop").returncode == 0
