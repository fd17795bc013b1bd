"""The TorchServe pod's inference gateway: predictions for in-cluster callers, without handing out a key.

TorchServe 0.12 generates its keys at start and keeps them in the pod (``key_file.json``); they
cannot be supplied from outside. The in-cluster deploy step (:mod:`components.cluster_deploy`) must
score the probe images against the served model, so this sidecar, in the TorchServe pod, forwards
``POST /predictions/<model>[/<version>]`` and ``GET /ping`` to TorchServe's inference port on
localhost with the inference key read from the shared key file (renewed with the API key over the
pod's own management port when it expires). Nothing else is forwarded: no management call, no key
in a response. The NetworkPolicy opens its port only to pods labelled ``tfanet.io/torchserve-parity=true``
(the deploy task), so neither the management nor the inference key leaves the pod.

    python -m components.inference_gateway --key-file /home/model-server/work/key_file.json --port 8083
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from components.serving.torchserve import TorchServeClient, TorchServeError

__all__ = ["PORT", "main", "make_server"]

PORT = 8083
_PREDICTIONS = re.compile(r"^/predictions/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FORWARDED_HEADERS = ("Content-Type", "X-Return-Map")
_MAX_BODY = 64 << 20


def make_server(client: TorchServeClient, host: str = "0.0.0.0", port: int = PORT) -> ThreadingHTTPServer:
    """A server forwarding predictions and ``/ping`` through ``client`` (which holds the key file)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, method: str, body: bytes | None) -> None:
            headers = {k: v for k in _FORWARDED_HEADERS if (v := self.headers.get(k)) is not None}
            try:
                resp = client.request(method, "inference", self.path, body, headers)
            except (TorchServeError, OSError) as exc:
                self._answer(502, f'{{"message": "TorchServe unreachable: {type(exc).__name__}"}}'.encode())
                return
            self._answer(resp.status, resp.body)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._forward("GET", None)
            else:
                self._answer(404, b'{"message": "only POST /predictions/<model>[/<version>] and GET /ping"}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not _PREDICTIONS.match(self.path):
                self._answer(404, b'{"message": "only POST /predictions/<model>[/<version>] and GET /ping"}')
            elif length > _MAX_BODY:
                self._answer(413, b'{"message": "request body too large"}')
            else:
                self._forward("POST", self.rfile.read(length))

        def log_message(self, format: str, *args: object) -> None:
            return  # TorchServe logs every request already

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.inference_gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--key-file", required=True, help="TorchServe's key_file.json (the pod's work directory)")
    parser.add_argument("--inference", default="http://127.0.0.1:8080", help="default: %(default)s")
    parser.add_argument("--management", default="http://127.0.0.1:8081", help="for key renewal; default: %(default)s")
    parser.add_argument("--host", default="0.0.0.0", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=PORT, help="default: %(default)s")
    args = parser.parse_args(argv)
    server = make_server(TorchServeClient(args.inference, args.management, args.key_file), args.host, args.port)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
