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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tfanet_core.errors import TfanetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
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

#: File name extensions (lower case) treated as images everywhere in tfanet.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Modes whose samples do not fit in 8 bits: converting them to RGB would clip or rescale
# silently, so the user has to decide how to map them to 8 bits.
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(TfanetError):
    """A problem with the user's data (not with tfanet): the message names the file and the fix."""


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file whose extension is one of :data:`IMAGE_EXTENSIONS`."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (Pillow reads 16-bit RGB PNGs as 8-bit RGB without telling)."""
    if len(data) >= 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return struct.unpack("B", data[24:25])[0]
    return None


def _decode(path: Path, data: bytes) -> Image.Image:
    """Decode fully from memory; every decoder failure becomes a DataError naming ``path``."""
    if not data:
        raise DataError(f"{path}: empty file (0 bytes); re-copy it from the source or delete it")
    try:
        # verify() walks the whole container (PNG chunk CRCs, IEND) without decoding pixels;
        # load() then decodes every pixel, which is what detects truncated JPEG/PNG data.
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image Pillow can read (wrong extension or not an image at all); "
            f"convert it to PNG or remove it from the dataset folder"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a decompression bomb ({exc}); downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise DataError(
            f"{path}: corrupt or truncated image ({exc}); re-copy it from the source or delete it"
        ) from None
    return img


def open_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open an image fully, keeping its stored mode; reject what cannot become 8-bit RGB.

    ``data`` lets a caller that already read the bytes (to hash them) avoid a second read.
    The returned image is loaded, so its ``mode`` is the mode as stored.
    """
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file ({exc.strerror}); check it exists and is readable") from None
    img = _decode(path, data)
    depth = _png_bit_depth(data)
    if img.mode in _HIGH_BIT_MODES or (depth is not None and depth > 8):
        raise DataError(
            f"{path}: {depth or 'more than 8'}-bit image (mode {img.mode}); tfanet reads 8-bit images only. "
            f"Convert it to 8 bits with the same windowing as your inspection software "
            f"(e.g. `convert in.png -depth 8 out.png`)"
        )
    return img


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
    """Open a mask fully, any bit depth (only ``> 0`` matters); DataError if unreadable or truncated."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the mask ({exc.strerror}); check it exists and is readable") from None
    return _decode(path, data)


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


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image → float32 tensor [3, size, size] in [0, 1], bilinear with antialiasing.

    Not normalized on purpose: the normalization belongs to the backbone weights
    (ImageNet mean/std for WRN50, 0.5/0.5 for EfficientNet-Lite) and is applied by the
    feature extractor, so one tensor works with every backbone.
    """
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(0).clamp_(0.0, 1.0)
