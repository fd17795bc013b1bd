"""A small client for TorchServe 0.12's management and inference APIs, with token authorization.

Keys come from the server's ``key_file.json`` (management key for management calls, inference key
for predictions and ``/ping``). They expire (``token_expiration_min``): an expired or nearly expired
key is renewed with the API key (``POST /token?type=...``), which rewrites the key file. TorchServe
answers a missing or wrong key with HTTP 400, not 401.

Standard library only, so the deploy step and the load test need nothing beyond the stack.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tfanet_core.errors import TfanetError

RENEW_MARGIN = timedelta(seconds=60)


class TorchServeError(RuntimeError):
    """A management/inference call failed: ``status`` and TorchServe's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"TorchServe answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        try:
            doc = self.json()
        except ValueError:
            return self.body.decode("utf-8", "replace")
        return doc.get("message", "") if isinstance(doc, dict) else str(doc)


def _expired(entry: dict[str, Any]) -> bool:
    stamp = entry.get("expiration time")
    if not stamp:
        return False
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return False
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when - RENEW_MARGIN < datetime.now(UTC)


class TorchServeClient:
    """``inference``/``management`` are base URLs; ``key_file`` None means token auth is off."""

    def __init__(self, inference: str, management: str, key_file: Path | str | None, timeout: float = 120.0) -> None:
        self.inference = inference.rstrip("/")
        self.management = management.rstrip("/")
        self.key_file = Path(key_file) if key_file is not None else None
        self.timeout = timeout

    @classmethod
    def from_state_dir(cls, state_dir: Path | str, timeout: float = 120.0) -> TorchServeClient:
        """The server started by ``components.serving.server.start(state_dir)`` (reads its server.json)."""
        path = Path(state_dir) / "server.json"
        if not path.is_file():
            raise TfanetError(
                f"{path} missing: start TorchServe with `python -m infra.local.torchserve start --state-dir DIR`"
            )
        info = json.loads(path.read_text())
        return cls(info["inference"], info["management"], info["key_file"], timeout)

    # -- transport ---------------------------------------------------------------------------------
    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Response:
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return Response(resp.status, resp.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, err.read())

    def _keys(self) -> dict[str, Any]:
        assert self.key_file is not None
        try:
            return json.loads(self.key_file.read_text())
        except FileNotFoundError:
            raise TorchServeError(
                0, f"{self.key_file} not found: is TorchServe running from that directory with token auth on?"
            ) from None

    def key(self, kind: str) -> str | None:
        """The ``management`` or ``inference`` key, renewed first if it expires within a minute."""
        if self.key_file is None:
            return None
        keys = self._keys()
        if _expired(keys[kind]):
            api = {"Authorization": f"Bearer {keys['API']['key']}"}
            resp = self._send("POST", f"{self.management}/token?type={kind}", None, api)
            if resp.status != 200:
                raise TorchServeError(resp.status, f"renewing the {kind} key failed: {resp.message}")
            keys = self._keys()
        return keys[kind]["key"]

    def request(
        self,
        method: str,
        api: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> Response:
        """One call; ``api`` is ``"management"`` or ``"inference"``; ``token`` overrides the key file."""
        base = self.management if api == "management" else self.inference
        headers = dict(headers or {})
        key = token if token is not None else self.key(api)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self._send(method, base + path, body, headers)

    def _ok(self, resp: Response) -> Any:
        if resp.status != 200:
            raise TorchServeError(resp.status, resp.message)
        return resp.json()

    # -- management --------------------------------------------------------------------------------
    def register(
        self,
        mar: str,
        model_name: str,
        batch_size: int,
        max_batch_delay_ms: int,
        initial_workers: int = 1,
        response_timeout_s: int = 120,
    ) -> dict[str, Any]:
        """Register ``mar`` (a file name in the model store, or a URL) and wait until its workers are up.

        The archive's version (``--version``) becomes the TorchServe version; a product's first
        version becomes its default, later ones do not until :meth:`set_default`.
        """
        query = urllib.parse.urlencode(
            {
                "url": mar,
                "model_name": model_name,
                "initial_workers": initial_workers,
                "synchronous": "true",
                "batch_size": batch_size,
                "max_batch_delay": max_batch_delay_ms,
                "response_timeout": response_timeout_s,
            }
        )
        return self._ok(self.request("POST", "management", f"/models?{query}"))

    def set_default(self, model_name: str, version: str) -> dict[str, Any]:
        return self._ok(self.request("PUT", "management", f"/models/{model_name}/{version}/set-default"))

    def unregister(self, model_name: str, version: str) -> dict[str, Any]:
        return self._ok(self.request("DELETE", "management", f"/models/{model_name}/{version}"))

    def models(self) -> list[str]:
        return [m["modelName"] for m in self._ok(self.request("GET", "management", "/models?limit=1000"))["models"]]

    def versions(self, model_name: str) -> list[dict[str, Any]]:
        """TorchServe's description of every registered version (workers, batch size, ...)."""
        return self._ok(self.request("GET", "management", f"/models/{model_name}/all"))

    def default_version(self, model_name: str) -> str:
        [described] = self._ok(self.request("GET", "management", f"/models/{model_name}"))
        return described["modelVersion"]

    # -- inference ---------------------------------------------------------------------------------
    def ping(self) -> bool:
        resp = self.request("GET", "inference", "/ping")
        return resp.status == 200 and resp.json().get("status") == "Healthy"

    def predict(
        self,
        model_name: str,
        image: bytes,
        version: str | None = None,
        return_map: bool = False,
        content_type: str = "application/octet-stream",
    ) -> Response:
        """POST image bytes (or a JSON document with ``content_type="application/json"``); no raise on 4xx.

        ``return_map`` sends ``X-Return-Map: true`` (a JSON document carries its own ``return_map``).
        """
        path = f"/predictions/{model_name}" + (f"/{version}" if version else "")
        headers = {"Content-Type": content_type, **({"X-Return-Map": "true"} if return_map else {})}
        return self.request("POST", "inference", path, image, headers)
