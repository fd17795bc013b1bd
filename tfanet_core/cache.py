"""Content-addressed store of frozen-backbone layer maps (docs/architecture.md §Feature cache).

A pure store: :meth:`FeatureCache.get` and :meth:`FeatureCache.put` by key, where the key is
sha256 over a namespace (everything besides the image bytes that determines the maps: backbone
tag and weights, layers, stem pooling, input size, preprocessing) and sha256(image bytes). It knows
nothing about the extractor; the read-through (hash, look up, compute the misses, store) is
``tfanet_core.features.extract_features``.

What is stored: the per-layer maps at their native resolution, *before* the bilinear resize
and concatenation (``FeatureExtractor.fuse``), in float16. For the paper's WRN50 at 256 px
that is 2.1 M values = 4 MiB per image instead of 1856×64×64 float32 = 29 MiB fused. Because
fusion happens after the cache, ``features.feature_size`` is not part of the key: a feature-size
ablation reuses every entry. float16 keeps 11 significant bits, so each stored value has a
relative rounding error ≤ 2⁻¹¹ ≈ 4.9e-4 (values below 6.1e-5 lose relative precision, their
absolute error stays ≤ 3e-8); the measured effect on fused features and anomaly scores is in
``benchmarks/results/perf.md``. :meth:`FeatureCache.put` returns the maps as stored, so a cold
run fuses the same float16 values a warm run reads.

Safety without locks: one file per entry under a two-level fan-out, written to a temporary file
in the same directory and moved into place with ``os.replace`` (atomic on POSIX), no shared
index. Concurrent writers of one key write identical bytes and the last rename wins; a reader
sees either no file or a complete one. Each entry carries its payload length and a BLAKE2b
checksum, so a file truncated or corrupted by anything else (a full disk, a crash before the
data reached the disk) is detected on read, counted, and reported as a miss (the caller recomputes
and overwrites it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"TFAFEAT1"
SUFFIX = ".tfc"
STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to a killed writer
_HEADER_LEN = struct.Struct("<I")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def default_cache_dir() -> Path | None:
    """``$TFANET_CACHE_DIR`` or ``~/.cache/tfanet/features``; ``TFANET_CACHE_DIR=off`` disables caching."""
    value = os.environ.get("TFANET_CACHE_DIR")
    if value is None:
        return Path.home() / ".cache" / "tfanet" / "features"
    return resolve_cache_dir(value)


def resolve_cache_dir(value: Path | str | None) -> Path | None:
    """A user's ``--cache-dir``: None → the default, ``off``/``none``/empty → no cache, else the path."""
    if value is None:
        return default_cache_dir()
    if str(value).strip().lower() in ("", "off", "none", "0"):
        return None
    return Path(value).expanduser()


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5GiB``, ``123456`` → bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"cannot read size {text!r}; write e.g. 500M, 2G or a number of bytes") from None


def entry_key(namespace: dict[str, Any], image_sha256: str) -> str:
    """The content address of one image's maps under ``namespace``."""
    payload = json.dumps(namespace, sort_keys=True) + "\n" + image_sha256
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheStats:
    """Counters a caller (or a test) reads to see what a run actually computed."""

    hits: int = 0
    misses: int = 0  # lookups that found nothing usable (absent or corrupt)
    corrupt: int = 0  # entries found truncated or corrupted (the caller recomputes and overwrites them)
    forwards: int = 0  # backbone forward passes (batches) the read-through ran for misses
    bytes_read: int = 0
    bytes_written: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class CorruptEntry(ValueError):
    """An entry file that is not a complete, checksummed cache entry."""


def _encode(namespace: dict[str, Any], image_sha256: str, maps: Sequence[torch.Tensor]) -> bytes:
    payload = b"".join(m.contiguous().numpy().tobytes() for m in maps)
    header = {
        "namespace": namespace,
        "image_sha256": image_sha256,
        "layers": [{"shape": list(m.shape), "dtype": str(m.dtype).removeprefix("torch.")} for m in maps],
        "payload_bytes": len(payload),
        "blake2b": hashlib.blake2b(payload, digest_size=16).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload


def _read_header(buffer: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    if len(buffer) < len(MAGIC) + _HEADER_LEN.size or bytes(buffer[: len(MAGIC)]) != MAGIC:
        raise CorruptEntry("bad magic (not a tfanet cache entry, or truncated)")
    (length,) = _HEADER_LEN.unpack_from(buffer, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if len(buffer) < start + length:
        raise CorruptEntry("truncated header")
    try:
        header = json.loads(bytes(buffer[start : start + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntry(f"unreadable header ({exc})") from None
    return header, start + length


def _decode(buffer: bytearray) -> list[torch.Tensor]:
    header, offset = _read_header(buffer)
    payload = memoryview(buffer)[offset:]
    if len(payload) != header["payload_bytes"]:
        raise CorruptEntry(f"payload is {len(payload)} bytes, header says {header['payload_bytes']} (truncated)")
    if hashlib.blake2b(payload, digest_size=16).hexdigest() != header["blake2b"]:
        raise CorruptEntry("checksum mismatch (corrupted)")
    maps = []
    for layer in header["layers"]:
        dtype = _DTYPES[layer["dtype"]]
        count = math.prod(layer["shape"])
        maps.append(torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(layer["shape"]))
        offset += count * dtype.itemsize
    return maps


class FeatureCache:
    """One file per (image content, backbone namespace) under ``root/ab/cd/<key>.tfc``."""

    def __init__(self, root: Path | str, dtype: torch.dtype = torch.float16) -> None:
        if dtype not in _DTYPES.values():
            raise ValueError(f"cache dtype must be float16 or float32, got {dtype}")
        self.root = Path(root).expanduser()
        self.dtype = dtype
        self.stats = CacheStats()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / f"{key}{SUFFIX}"

    # --- entries --------------------------------------------------------------------------------------

    def get(self, key: str) -> list[torch.Tensor] | None:
        """The stored maps, or None when absent or unreadable (a corrupt entry is counted and logged)."""
        path = self.path_for(key)
        try:
            with open(path, "rb") as fh:
                buffer = bytearray(os.fstat(fh.fileno()).st_size)
                fh.readinto(buffer)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        try:
            maps = _decode(buffer)
        except (CorruptEntry, KeyError, TypeError, ValueError, RuntimeError) as exc:
            self.stats.corrupt += 1
            self.stats.misses += 1
            log.warning("feature cache entry %s is unusable (%s); recomputing it", path, exc)
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(buffer)
        # "Last used", for `tfanet cache prune --max-size`. Pruned or replaced meanwhile: the maps in hand are
        # complete either way.
        with contextlib.suppress(OSError):
            os.utime(path)
        return maps

    def put(
        self, key: str, namespace: dict[str, Any], image_sha256: str, maps: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Store one image's maps (CPU tensors) atomically: a temp file in the entry's directory, then
        ``os.replace``. Returns the maps as stored (in the cache's dtype), i.e. what :meth:`get` will return."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = [self._store_dtype(m) for m in maps]
        data = _encode(namespace, image_sha256, stored)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats.bytes_written += len(data)
        return stored

    def _store_dtype(self, m: torch.Tensor) -> torch.Tensor:
        low = m.to(self.dtype)
        # float16 overflows above 65504: keep such a layer in float32 rather than store inf.
        return low if bool(torch.isfinite(low).all()) else m.float()

    # --- housekeeping ------------------------------------------------------------------------------------

    def _walk(self) -> tuple[list[Path], list[Path]]:
        entries: list[Path] = []
        temps: list[Path] = []
        if not self.root.is_dir():
            return entries, temps
        for path in self.root.glob("*/*/*"):
            if path.name.endswith(".tmp"):
                temps.append(path)
            elif path.suffix == SUFFIX:
                entries.append(path)
        return entries, temps

    def report(self, verify: bool = False) -> dict[str, Any]:
        """Entries and bytes in total and per (backbone, layers, image size); ``verify`` checksums every entry."""
        entries, temps = self._walk()
        groups: dict[str, dict[str, Any]] = {}
        total = corrupt = 0
        for path in entries:
            head: bytes | bytearray
            try:
                if verify:
                    buffer = bytearray(path.read_bytes())
                    _decode(buffer)
                    head = buffer
                else:
                    with open(path, "rb") as fh:
                        head = fh.read(1 << 16)
                namespace = _read_header(head)[0]["namespace"]
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            except (CorruptEntry, KeyError, TypeError, ValueError):
                corrupt += 1
                continue
            total += size
            name = f"{namespace['backbone']} layers={namespace['layers']} size={namespace['image_size']}"
            group = groups.setdefault(name, {"entries": 0, "bytes": 0, "namespace": namespace})
            group["entries"] += 1
            group["bytes"] += size
        return {
            "root": str(self.root),
            "entries": sum(g["entries"] for g in groups.values()),
            "bytes": total,
            "corrupt": corrupt,
            "verified": verify,
            "temp_files": len(temps),
            "groups": groups,
        }

    def prune(
        self,
        max_bytes: int | None = None,
        older_than_days: float | None = None,
        everything: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Delete all entries, those unused for ``older_than_days``, then least recently used ones down to
        ``max_bytes``; stale temp files of killed writers always go. Safe while others read or write: a
        reader of a deleted entry sees a miss and recomputes."""
        now = time.time()
        entries, temps = self._walk()
        infos = []
        for path in entries:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            infos.append((st.st_mtime, st.st_size, path))
        infos.sort()  # least recently used first
        doomed: list[tuple[float, int, Path]] = []
        keep: list[tuple[float, int, Path]] = []
        for item in infos:
            old = older_than_days is not None and now - item[0] > older_than_days * 86400
            (doomed if everything or old else keep).append(item)
        if max_bytes is not None:
            kept_bytes = sum(size for _, size, _ in keep)
            while keep and kept_bytes > max_bytes:
                item = keep.pop(0)
                kept_bytes -= item[1]
                doomed.append(item)
        stale = []
        for path in temps:
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    stale.append(path)
        if not dry_run:
            for _, _, path in doomed:
                path.unlink(missing_ok=True)
            for path in stale:
                path.unlink(missing_ok=True)
        return {
            "root": str(self.root),
            "dry_run": dry_run,
            "removed": len(doomed),
            "freed_bytes": sum(size for _, size, _ in doomed),
            "kept": len(keep),
            "kept_bytes": sum(size for _, size, _ in keep),
            "stale_temp_files_removed": len(stale),
        }
