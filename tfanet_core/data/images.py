"""Reading images and masks, with errors that name the file and say what to do.

A quality engineer's folders contain whatever the line camera and the people around it
produced: grayscale and palette PNGs, RGBA screenshots, 16-bit exports, half-copied files,
``Thumbs.db``. Everything here either returns a clean 8-bit RGB image / boolean mask or
raises :class:`DataError` naming the file; nothing is silently repaired (in particular
``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on, so a truncated file is an error,
not an image with a grey bottom half).
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tfanet_core.errors import TfanetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "REFUSALS",
    "DataError",
    "ImageError",
    "decode_image",
    "image_to_tensor",
    "is_image_file",
    "load_mask",
    "load_rgb",
    "mask_to_array",
    "mask_to_tensor",
    "open_image",
    "open_mask_image",
    "to_rgb",
]

#: The image formats Pillow may even try, for files and requests alike.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
#: File name extensions (lower case) treated as images everywhere in tfanet.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Modes whose samples do not fit in 8 bits: converting them to RGB would clip or rescale
# silently, so the user has to decide how to map them to 8 bits.
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(TfanetError):
    """A problem with the user's data (not with tfanet): the message names the file and the fix."""


#: Largest encoded image accepted (bytes); the server's request limit is the same number.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Largest decoded image (width × height); 64 MP RGB is 192 MB of pixels.
MAX_PIXELS = 64_000_000
#: Smallest side accepted: below this an image carries no inspectable structure.
MIN_SIDE = 32
#: Why an image is refused: the same kinds wherever an image enters tfanet (dataset, CLI, endpoint).
REFUSALS = ("empty", "too_large", "unsupported_format", "corrupt", "too_small", "high_bit_depth")


class ImageError(DataError):
    """An image tfanet refuses; ``kind`` (one of :data:`REFUSALS`) and ``reason`` say why, the same everywhere.

    The message is ``"<source>: <reason>"``; ``reason`` alone is what training, ``tfanet predict`` and
    the endpoint all report for the same bytes.
    """

    def __init__(self, source: str, kind: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.kind = kind
        self.reason = reason


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file whose extension is one of :data:`IMAGE_EXTENSIONS`."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (Pillow reads 16-bit RGB PNGs as 8-bit RGB without telling)."""
    if len(data) >= 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return struct.unpack("B", data[24:25])[0]
    return None


def _format_name(data: bytes) -> str:
    return "PNG" if data.startswith(_PNG_SIGNATURE) else "JPEG" if data.startswith(b"\xff\xd8") else "image"


def _open(data: bytes, source: str) -> Image.Image:
    """Open (header only); unreadable bytes become an ImageError. A decompression bomb is refused from the header."""
    if not data:
        raise ImageError(source, "empty", "empty image (0 bytes); send or copy the complete PNG/JPEG file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(source, "too_large", f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if _format_name(data) != "image":
            raise ImageError(
                source, "corrupt", f"corrupt {_format_name(data)}: Pillow cannot read it; re-export the image"
            ) from None
        raise ImageError(
            source,
            "unsupported_format",
            f"not a {'/'.join(FORMATS)} image (starts with {data[:8]!r}); convert it to PNG",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            source, "too_large", f"{exc}; at most {MAX_PIXELS} pixels are accepted: downscale the image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(
            source, "corrupt", f"corrupt {_format_name(data)} header ({exc}); re-export the image"
        ) from None


def _load(img: Image.Image, data: bytes, source: str) -> Image.Image:
    """Decode every pixel: what detects truncated data (LOAD_TRUNCATED_IMAGES stays off: no grey-filled images)."""
    try:
        # verify() walks the container (PNG chunk CRCs, IEND) without decoding; load() decodes every pixel.
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            probe.verify()
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(
            source, "corrupt", f"corrupt or truncated {_format_name(data)} ({exc}); re-copy the complete file"
        ) from None
    return img


def decode_image(data: bytes, source: str) -> Image.Image:
    """The one decoder and set of refusal rules for images, wherever they come from (files, requests).

    Returns the fully decoded image in its stored mode, or raises :class:`ImageError`: empty, too large
    (bytes or pixels, checked from the header before decoding), not one of :data:`FORMATS` (a small
    parser surface for untrusted bytes), corrupt or truncated,
    a side under :data:`MIN_SIDE`, or more than 8 bits per sample. 16-bit images are refused, not
    converted: mapping 16 bits to 8 needs the windowing of the inspection software, and the model
    never saw any other.
    """
    img = _open(data, source)
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            source, "too_large", f"image is {width}x{height} = {width * height} pixels; at most {MAX_PIXELS} accepted"
        )
    depth = _png_bit_depth(data)
    if img.mode in _HIGH_BIT_MODES or (depth is not None and depth > 8):
        raise ImageError(
            source,
            "high_bit_depth",
            f"{depth or 'more than 8'}-bit image (mode {img.mode}); tfanet reads 8-bit images only. Convert it "
            f"to 8 bits with the same windowing as your inspection software (e.g. `convert in.png -depth 8 out.png`)",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(source, "too_small", f"image is {width}x{height}; both sides must be at least {MIN_SIDE} px")
    return _load(img, data, source)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror}); check it exists and is readable") from None


def open_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open an image file fully, keeping its stored mode; :func:`decode_image`'s rules refuse the rest.

    ``data`` lets a caller that already read the bytes (to hash them) avoid a second read.
    """
    path = Path(path)
    return decode_image(_read(path, "file") if data is None else data, str(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any 8-bit mode to RGB.

    Alpha is *dropped* (the colour values are kept as stored, not composited on a
    background): in inspection images alpha is an export artefact, not part of the part.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "RGBa", "RGBX"):
        return img.convert("RGB")
    if img.mode in ("LA", "La"):
        return img.getchannel("L").convert("RGB")
    if img.mode in ("P", "PA"):
        # Through RGBA so palette transparency is expanded, then alpha dropped as above.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path | str) -> Image.Image:
    """Load an image as 8-bit RGB (grayscale/palette/LA/RGBA/CMYK converted, alpha dropped)."""
    return to_rgb(open_image(path))


def open_mask_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open a mask fully, any bit depth and size (only ``> 0`` matters); ImageError if unreadable or truncated."""
    path = Path(path)
    data = _read(path, "mask") if data is None else data
    return _load(_open(data, str(path)), data, str(path))


def _mask_array(path: Path) -> np.ndarray:
    """One mask file as a (H, W) bool array: any channel > 0 is defect (LOCO codes 249..255 too)."""
    img = open_mask_image(path)
    if img.mode not in ("1", "L", "RGB") and img.mode not in _HIGH_BIT_MODES:
        img = to_rgb(img)  # palette expanded, alpha dropped: alpha says nothing about the defect
    arr = np.asarray(img)
    return np.any(arr > 0, axis=-1) if arr.ndim == 3 else arr > 0


def load_mask(paths: Sequence[Path | str], size: tuple[int, int] | None = None) -> np.ndarray:
    """Union of ``> 0`` pixels over *every* mask file, optionally resized to ``size = (H, W)``.

    MVTec LOCO stores one PNG per defect (pixel value = defect code) for a single image;
    reading only the first file loses defects, so all are read. Resizing is NEAREST so
    the mask stays binary and no pixel is invented. Masks of one image must agree in
    size unless ``size`` is given.
    """
    if not paths:
        raise ValueError("load_mask needs at least one mask path")
    union: np.ndarray | None = None
    first = Path(paths[0])
    for p in map(Path, paths):
        m = _mask_array(p)
        if size is not None and m.shape != tuple(size):
            m = mask_to_array(m, size)
        if union is None:
            union = m
        elif union.shape != m.shape:
            raise DataError(
                f"{p}: mask is {m.shape[1]}x{m.shape[0]} but {first} is {union.shape[1]}x{union.shape[0]}; "
                f"all masks of one image must have the image's size"
            )
        else:
            union |= m
    assert union is not None
    return union


def mask_to_array(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to ``size`` (int → square, or (H, W)) with NEAREST; returns bool."""
    h, w = (size, size) if isinstance(size, int) else size
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (h, w):
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(img.resize((w, h), Image.Resampling.NEAREST)) > 0


def mask_to_tensor(mask: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """:func:`mask_to_array` as a ``torch.bool`` tensor of shape (H, W)."""
    return torch.from_numpy(mask_to_array(mask, size))


def image_to_tensor(img: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """RGB image → float32 tensor [3, H, W] in [0, 1] (``size``: int → square, or (H, W)), bilinear with antialiasing.

    Not normalized on purpose: the normalization belongs to the backbone weights
    (ImageNet mean/std for WRN50, 0.5/0.5 for EfficientNet-Lite) and is applied by the
    feature extractor, so one tensor works with every backbone.
    """
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if x.shape[-2:] != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(0).clamp_(0.0, 1.0)
