"""Start, stop and inspect a TorchServe 0.12 on loopback, all of its state in one directory.

    python -m infra.local.torchserve start  [--state-dir .tfanet/torchserve]
    python -m infra.local.torchserve status
    python -m infra.local.torchserve stop

The logic lives here, in an installed package, so tests, benchmarks and the demo import it;
``infra/local/torchserve.py`` is only the entry point (as for ``components.stack``).
The state dir holds ``config.properties`` (from :data:`CONFIG_TEMPLATE`),
``model_store/``, ``logs/``, ``console.log`` (java's and the workers' stdout), ``key_file.json``
(token auth stays on) and ``server.json`` (addresses, key file, PIDs) which clients read
(``TorchServeClient.from_state_dir``).

TorchServe keeps its PID file in ``tempfile.gettempdir()`` (``/tmp/.model_server.pid``, one per
machine) and its worker sockets in ``java.io.tmpdir`` (``/tmp/.ts.sock.<port>``); ``TMPDIR`` and
``TEMP`` pointed at ``<state>/tmp`` move both, so several servers (tests, the demo) can run at once.
The server runs in its own process group (:mod:`components.supervisor`); ``stop`` asks
``torchserve --stop`` first, then signals that group if it is still ours (never processes by name).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from components import supervisor

CONFIG_TEMPLATE = """\
# TorchServe config for the local stack, written by components/serving/server.py (placeholders in braces).
# Everything binds loopback only. Token authorization stays ON (TorchServe 0.12's default): the keys are
# written to key_file.json in the server's working directory (the state dir) and deleted on shutdown.
inference_address=http://127.0.0.1:{inference_port}
management_address=http://127.0.0.1:{management_port}
metrics_address=http://127.0.0.1:{metrics_port}
grpc_inference_address=127.0.0.1
grpc_inference_port={grpc_inference_port}
grpc_management_address=127.0.0.1
grpc_management_port={grpc_management_port}
model_store={model_store}
# The model API (register/unregister/set-default) is off by default in 0.12; the deploy step needs it.
enable_model_api=true
# Management and inference keys expire after this many minutes; clients renew them with the API key.
token_expiration_min={token_expiration_min}
default_workers_per_model=1
install_py_dep_per_model=false
disable_system_metrics=true
metrics_mode=prometheus
# Hand request bodies to the handler as raw bytes: it parses and validates JSON itself (components/serving/payload.py).
decode_input_request=false
# = payload.MAX_BODY_BYTES: larger bodies are refused by the server with 413 before reaching a worker.
max_request_size={max_request_size}
max_response_size={max_response_size}
vmargs=-Xmx1g
"""
DEFAULT_PORTS = {
    "inference": 21080,
    "management": 21081,
    "metrics": 21082,
    "grpc_inference": 21090,
    "grpc_management": 21091,
}
SERVER_FILE = "server.json"
#: = ``payload.MAX_BODY_BYTES`` (a test keeps them equal); not imported, so this module stays stdlib-only.
MAX_REQUEST_BYTES = 32 * 1024 * 1024


class ServerError(RuntimeError):
    """TorchServe did not start or stop as asked; the message points at the log to read."""


@dataclass
class ServerInfo:
    state_dir: str
    inference: str
    management: str
    metrics: str
    key_file: str
    java_pid: int
    pgid: int
    start_time: int | None = None  # of the group leader (the launcher): a recycled pgid is never signalled

    def record(self) -> supervisor.Supervised:
        return supervisor.Supervised(self.pgid, self.start_time)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> dict[str, int]:
    """Five distinct free loopback ports (tests run servers side by side)."""
    ports: dict[str, int] = {}
    while len(ports) < len(DEFAULT_PORTS):
        port = free_port()
        if port not in ports.values():
            ports[list(DEFAULT_PORTS)[len(ports)]] = port
    return ports


def _env(state: Path) -> dict[str, str]:
    tmp = state / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)  # the worker must be this venv's python
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "TMPDIR": str(tmp), "TEMP": str(tmp)}


def _pid_file(state: Path) -> Path:
    return state / "tmp" / ".model_server.pid"


def _log_tail(state: Path, lines: int = 30) -> str:
    log = state / "logs" / "ts_log.log"
    if not log.is_file():
        return f"(no {log})"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def read_info(state_dir: Path | str) -> ServerInfo | None:
    path = Path(state_dir) / SERVER_FILE
    return ServerInfo(**json.loads(path.read_text())) if path.is_file() else None


def _ping(info: ServerInfo) -> bool:
    try:
        keys = json.loads(Path(info.key_file).read_text())
        req = urllib.request.Request(
            f"{info.inference}/ping", headers={"Authorization": f"Bearer {keys['inference']['key']}"}
        )
        with urllib.request.urlopen(req, timeout=2) as resp:
            return json.loads(resp.read()).get("status") == "Healthy"
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return False


def start(
    state_dir: Path | str,
    ports: dict[str, int] | None = None,
    timeout: float = 120.0,
    token_expiration_min: int = 24 * 60,
) -> ServerInfo:
    """Start TorchServe with its state in ``state_dir``; returns once ``/ping`` is healthy."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    running = read_info(state)
    if running is not None and supervisor.running(running.record()):
        raise ServerError(f"TorchServe already runs from {state} (pid {running.java_pid}); stop it first")
    ports = {**DEFAULT_PORTS, **(ports or {})}
    model_store = state / "model_store"
    model_store.mkdir(exist_ok=True)
    config = state / "config.properties"
    config.write_text(
        CONFIG_TEMPLATE.format(
            **{f"{k}_port": v for k, v in ports.items()},
            model_store=model_store,
            token_expiration_min=token_expiration_min,
            max_request_size=MAX_REQUEST_BYTES,
            max_response_size=MAX_REQUEST_BYTES,
        )
    )
    (state / "key_file.json").unlink(missing_ok=True)
    # A new session: the launcher, java and its python workers share one process group we can signal.
    cmd = ["torchserve", "--start", "--ts-config", str(config), "--model-store", str(model_store), "--ncs"]
    launcher, rec = supervisor.launch(cmd, cwd=state, env=_env(state), log=state / "console.log", append=False)
    launcher.wait(timeout=60)
    pid_file = _pid_file(state)
    if launcher.returncode != 0 or not pid_file.is_file():
        raise ServerError(f"torchserve --start failed: {(state / 'console.log').read_text()[-2000:]}")
    info = ServerInfo(
        state_dir=str(state),
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        metrics=f"http://127.0.0.1:{ports['metrics']}",
        key_file=str(state / "key_file.json"),
        java_pid=int(pid_file.read_text().strip()),
        pgid=rec.pid,
        start_time=rec.start_time,
    )
    (state / SERVER_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
    outcome = supervisor.wait_ready(lambda: _ping(info), lambda: supervisor.running(rec), timeout)
    if outcome != "healthy":
        stop(state)
        why = "exited during start-up" if outcome == "exited" else f"not healthy after {timeout:.0f} s"
        raise ServerError(f"TorchServe {why}; {state}/logs/ts_log.log ends:\n{_log_tail(state)}")
    return info


def stop(state_dir: Path | str, timeout: float = 30.0) -> bool:
    """Stop the server started from ``state_dir``; True if one was running. Escalates to SIGKILL."""
    state = Path(state_dir).resolve()
    info = read_info(state)
    if info is None:
        return False
    rec = info.record()
    was_running = supervisor.running(rec)
    if was_running:
        subprocess.run(
            ["torchserve", "--stop"], cwd=state, env=_env(state), capture_output=True, timeout=60, check=False
        )
        supervisor.wait(lambda: not supervisor.running(rec), timeout, interval=0.2)
        try:
            supervisor.stop(rec, "TorchServe", timeout=10.0)
        except supervisor.SupervisorError as exc:
            raise ServerError(str(exc)) from None
    (state / SERVER_FILE).unlink(missing_ok=True)
    (state / "key_file.json").unlink(missing_ok=True)
    _pid_file(state).unlink(missing_ok=True)
    return was_running


def status(state_dir: Path | str) -> dict[str, object]:
    info = read_info(state_dir)
    if info is None or not supervisor.running(info.record()):
        return {"running": False, "state_dir": str(Path(state_dir).resolve())}
    return {"running": True, "healthy": _ping(info), **asdict(info)}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m components.serving.server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("TFANET_TORCHSERVE_DIR", ".tfanet/torchserve")),
        help="config, model store, logs, keys and PIDs (default: $TFANET_TORCHSERVE_DIR or ./.tfanet/torchserve)",
    )
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=port)
    args = parser.parse_args(argv)
    if args.command == "start":
        ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
        print(json.dumps(asdict(start(args.state_dir, ports)), indent=2))
    elif args.command == "stop":
        print("stopped" if stop(args.state_dir) else f"no TorchServe running from {args.state_dir}")
    else:
        print(json.dumps(status(args.state_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
