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
- 415 not a PNG or JPEG;
- 422 a PNG/JPEG that cannot be used: corrupt or truncated, smaller than ``MIN_SIDE`` pixels,
  or more than 8 bits per sample. 16-bit images are refused, not converted, for the same reason
  the training data path refuses them (``tfanet_core.data.images.open_image``): mapping 16 bits
  to 8 needs the windowing of the inspection software, and the model never saw any other.

Grayscale, palette, RGBA and CMYK become RGB exactly as in training (``to_rgb``: alpha dropped).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tfanet_core.data.images import to_rgb
from tfanet_core.predictor import Prediction

#: Largest request body accepted (bytes). Keep ``max_request_size`` in the server config equal.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Largest decoded image (width × height); 64 MP RGB is 192 MB of pixels.
MAX_PIXELS = 64_000_000
#: Smallest side accepted: below this an image carries no inspectable structure.
MIN_SIDE = 32
#: Formats Pillow may even try: a small parser surface for untrusted bytes.
FORMATS = ("PNG", "JPEG")

_JSON_FIELDS = frozenset({"image", "return_map"})
_JSON_EXAMPLE = '{"image": <base64 PNG/JPEG>, "return_map": false}'
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_REASONS = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity"}


class RequestError(ValueError):
    """A client error: ``status`` is the HTTP status to answer with, ``message`` what to do about it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def reason(self) -> str:
        return _REASONS.get(self.status, "Client Error")

    def to_json(self) -> dict[str, Any]:
        return {"code": self.status, "type": self.reason, "message": self.message}


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


def _png_bit_depth(data: bytes) -> int | None:
    """Bit depth from the IHDR chunk: Pillow reads 16-bit RGB PNGs as 8-bit RGB without telling."""
    if len(data) >= 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return data[24]
    return None


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG bytes → fully decoded 8-bit RGB image, or :class:`RequestError`."""
    if not data:
        raise RequestError(400, "empty image: send the PNG or JPEG bytes as the request body")
    if len(data) > MAX_BODY_BYTES:
        raise RequestError(413, f"image is {len(data)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if _format_name(data) != "image":
            raise RequestError(
                422, f"corrupt {_format_name(data)}: Pillow cannot read it; re-export the image"
            ) from None
        raise RequestError(
            415, f"not a PNG or JPEG image (starts with {data[:8]!r}); send PNG or JPEG bytes, or JSON with base64"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, f"{exc}; at most {MAX_PIXELS} pixels are accepted: downscale the image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise RequestError(422, f"corrupt {_format_name(data)} header ({exc}); re-export the image") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; at most {MAX_PIXELS} accepted")
    if min(width, height) < MIN_SIDE:
        raise RequestError(422, f"image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    depth = _png_bit_depth(data)
    if img.mode in _HIGH_BIT_MODES or (depth is not None and depth > 8):
        raise RequestError(
            422,
            f"{depth or 'more than 8'}-bit image (mode {img.mode}); only 8-bit images are accepted: convert it with "
            f"the same windowing as your inspection software (e.g. `convert in.png -depth 8 out.png`)",
        )
    try:
        # verify() walks the container (PNG chunk CRCs) without decoding; load() decodes every pixel,
        # which is what detects truncated data (LOAD_TRUNCATED_IMAGES stays off: no grey-filled images).
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            probe.verify()
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise RequestError(422, f"corrupt or truncated {_format_name(data)} ({exc}); send the complete file") from None
    return to_rgb(img)


def _format_name(data: bytes) -> str:
    return "PNG" if data.startswith(_PNG_SIGNATURE) else "JPEG" if data.startswith(b"\xff\xd8") else "image"


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
    if not body:
        raise RequestError(400, f"empty request body: send PNG/JPEG bytes, or JSON {_JSON_EXAMPLE}")
    body = bytes(body)
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
    }
    if return_map:
        if prediction.anomaly_map is None:
            raise ValueError("return_map requested but the predictor returned no map")
        out["anomaly_map"], out["anomaly_map_scale"] = encode_map(prediction.anomaly_map)
    return out
