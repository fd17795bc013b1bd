"""Turn one inference request into an RGB image, or into a client error with an HTTP status.

Server-agnostic on purpose (no TorchServe import): the handler is a thin adapter around
:func:`parse_request`, so another server could reuse it unchanged. The module is shipped next to
``handler.py`` inside the ``.mar``; it is not called ``requests.py`` because the archive's root
is on the worker's ``sys.path`` and would shadow the ``requests`` library there.

Accepted: the raw PNG/JPEG bytes as the body (header ``X-Return-Map: true`` asks for the map:
TorchServe does not pass query parameters to handlers), or a JSON object
``{"image": <base64 PNG/JPEG>, "return_map": <bool>}``. Everything else is refused
with a status and a message that says what to send instead:

- 400 the request itself is malformed (empty body, bad JSON, bad base64, wrong field types);
- 413 too large (body bytes, or decoded pixels: a decompression bomb is refused from the
  header, before any pixel is decoded);
- 415 not a PNG, JPEG, BMP or TIFF (the formats training reads);
- 422 an image that cannot be used: corrupt or truncated, too small, or more than 8 bits per sample.

Whether an image is usable is decided by the core's one decoder (``tfanet_core.data.images.decode_image``),
the same rules and reasons as for training data and ``tfanet predict``; this module only maps each
refusal kind to its HTTP status (:data:`STATUS_OF_REFUSAL`) and adds the request-level checks.

Grayscale, palette, RGBA and CMYK become RGB exactly as in training (``to_rgb``: alpha dropped).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tfanet_core.data import images
from tfanet_core.data.images import MAX_IMAGE_BYTES, to_rgb
from tfanet_core.predictor import Prediction

#: Largest request body accepted (bytes), the core's image limit. Keep ``max_request_size`` in the server config equal.
MAX_BODY_BYTES = MAX_IMAGE_BYTES

_JSON_FIELDS = frozenset({"image", "return_map"})
_JSON_EXAMPLE = '{"image": <base64 PNG/JPEG>, "return_map": false}'
_REASONS = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity"}


class RequestError(ValueError):
    """A client error: ``status`` is the HTTP status to answer with, ``message`` what to do about it.

    ``refusal`` is the image refusal kind (``tfanet_core.data.images.REFUSALS``) when the image itself was refused.
    """

    def __init__(self, status: int, message: str, refusal: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.refusal = refusal

    @property
    def reason(self) -> str:
        return _REASONS.get(self.status, "Client Error")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": self.status, "type": self.reason, "message": self.message}
        if self.refusal is not None:
            doc["refusal"] = self.refusal
        return doc


@dataclass
class ParsedRequest:
    image: Image.Image  # 8-bit RGB, fully decoded
    return_map: bool


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(400, f"{where} must be a boolean (true or false), got {value!r:.40}")


#: HTTP status of each kind of image refusal (tfanet_core.data.images.REFUSALS): the reason is the core's.
STATUS_OF_REFUSAL = {
    "empty": 400,
    "too_large": 413,
    "unsupported_format": 415,
    "corrupt": 422,
    "too_small": 422,
    "high_bit_depth": 422,
}


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG bytes → 8-bit RGB by the core's one decoder and rules, or :class:`RequestError` with its reason."""
    try:
        return to_rgb(images.decode_image(data, "request image"))
    except images.ImageError as err:
        raise RequestError(STATUS_OF_REFUSAL[err.kind], err.reason, refusal=err.kind) from None


def _parse_json(body: bytes | Mapping[str, Any]) -> ParsedRequest:
    if isinstance(body, Mapping):
        doc: Any = body
    else:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"malformed JSON ({exc}); send {_JSON_EXAMPLE}") from None
    if not isinstance(doc, Mapping):
        raise RequestError(400, f'JSON body must be an object with an "image" field, got {type(doc).__name__}')
    unknown = sorted(set(doc) - _JSON_FIELDS)
    if unknown:
        raise RequestError(400, f"unknown JSON field(s) {unknown}; allowed: {sorted(_JSON_FIELDS)}")
    encoded = doc.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise RequestError(400, 'JSON field "image" must be a non-empty base64 string of PNG or JPEG bytes')
    if len(encoded) > MAX_BODY_BYTES:
        raise RequestError(413, f"base64 image is {len(encoded)} characters; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f'JSON field "image" is not valid base64 ({exc}); use standard base64') from None
    return ParsedRequest(decode_image(data), _as_bool(doc.get("return_map", False), '"return_map"'))


def _looks_like_json(body: bytes) -> bool:
    return body.lstrip()[:1] in (b"{", b"[", b'"')


def parse_request(
    body: bytes | bytearray | str | Mapping[str, Any] | None,
    return_map: Any = None,
    content_type: str | None = None,
) -> ParsedRequest:
    """One request body → :class:`ParsedRequest`, or :class:`RequestError`.

    ``body`` is raw bytes (a server that already decoded JSON may pass the dict, and a text
    body may arrive as ``str``); ``return_map`` is the raw ``X-Return-Map`` header for byte
    bodies. JSON is recognised by its first character, not the Content-Type, because many
    clients send a wrong one; PNG and JPEG never start with ``{``. ``content_type`` only
    matters for form-encoded bodies (``curl -d``), which servers parse into fields: refused.
    """
    if content_type and content_type.lower().startswith("application/x-www-form-urlencoded"):
        raise RequestError(
            415,
            "form-encoded body (Content-Type application/x-www-form-urlencoded, curl -d's default) cannot carry "
            "an image: send the bytes with Content-Type application/octet-stream (curl --data-binary @img.png "
            "-H 'Content-Type: application/octet-stream') or JSON with Content-Type application/json",
        )
    if isinstance(body, Mapping):
        return _parse_json(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    body = bytes(body or b"")  # an empty body is refused by the image rules, with their reason
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    if _looks_like_json(body):
        return _parse_json(body)
    flag = False if return_map is None else _as_bool(return_map, "header X-Return-Map")
    return ParsedRequest(decode_image(body), flag)


def encode_map(amap: np.ndarray) -> tuple[str, float]:
    """Anomaly map → (base64 of a 16-bit grayscale PNG, scale): ``map = pixel / 65535 * scale``.

    16 bits keep the map quantitative (error ≤ scale / 131070) while any image viewer shows it;
    the scale is the map's maximum, so the PNG uses the full range.
    """
    amap = np.asarray(amap, dtype=np.float64)
    scale = float(amap.max()) if amap.size and amap.max() > 0 else 0.0
    levels = np.zeros(amap.shape, np.uint16) if scale == 0 else np.rint(amap / scale * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), scale


def decode_map(encoded: str, scale: float) -> np.ndarray:
    """Inverse of :func:`encode_map`, for clients and tests: float32 [H, W]."""
    with Image.open(io.BytesIO(base64.b64decode(encoded)), formats=["PNG"]) as img:
        levels = np.asarray(img, dtype=np.float64)
    return (levels / 65535.0 * scale).astype(np.float32)


def build_response(prediction: Prediction, product: str, model_version: str, return_map: bool) -> dict[str, Any]:
    """The JSON answer for one image (docs/architecture.md §Serving)."""
    out: dict[str, Any] = {
        "product": product,
        "model_version": model_version,
        "score": prediction.score,
        "threshold": prediction.threshold,
        "is_anomalous": prediction.is_anomalous,
        "templates": prediction.templates,  # the training image(s) it was aggregated onto, nearest first
    }
    if return_map:
        if prediction.anomaly_map is None:
            raise ValueError("return_map requested but the predictor returned no map")
        out["anomaly_map"], out["anomaly_map_scale"] = encode_map(prediction.anomaly_map)
        if prediction.pred_mask is not None:  # the bundle has a pixel threshold: the defect region, 0/255 PNG
            out["pred_mask"] = encode_mask(prediction.pred_mask)
    return out


def encode_mask(mask: np.ndarray) -> str:
    """Boolean defect mask → base64 of an 8-bit grayscale PNG (0 good, 255 defect), what any viewer shows."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
