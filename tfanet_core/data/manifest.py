"""The image manifest: one row per image, the single description of a dataset version.

Everything downstream (validation suite, feature cache, training, evaluation) reads the
manifest instead of walking folders again, so a dataset version is exactly one CSV file
that DVC can track and MLflow can name by :attr:`Manifest.version`.

Building it reads every image and mask once, and reports *all* unreadable, truncated,
16-bit or mislabelled files in one :class:`ManifestError` — fixing a dataset one error per
run is how people learn to hate a tool. Nothing is ever dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm import tqdm

from tfanet_core.data.images import DataError, open_image, open_mask_image
from tfanet_core.data.layouts import (
    GOOD,
    Sample,
    detect_layout,
    discover,
    find_orphan_masks,
    split_validation,
)

__all__ = ["COLUMNS", "Manifest", "ManifestError", "ManifestRow", "build_manifest"]

log = logging.getLogger(__name__)


class ManifestError(DataError):
    """Several data problems at once; ``problems`` holds (path, reason) for each."""

    def __init__(self, problems: Sequence[tuple[Path, str]], header: str) -> None:
        self.problems = list(problems)
        listing = "\n".join(f"  {p}: {why}" for p, why in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem(s)); fix or remove these files:\n{listing}")


@dataclass(frozen=True)
class ManifestRow:
    """One image. Paths are POSIX and relative to the dataset root, so a manifest is portable."""

    path: str
    sha256: str
    category: str
    split: str
    label: str
    defect_type: str | None
    mask_paths: tuple[str, ...]
    mask_sha256: tuple[str, ...]  # so a re-annotated mask changes the dataset version too
    width: int
    height: int
    mode: str  # PIL mode as stored (L, RGB, P, ...), before conversion to RGB


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ManifestRow))
_LIST_COLUMNS = ("mask_paths", "mask_sha256")


class Manifest:
    """Rows sorted by path, plus the dataset root that makes them absolute again."""

    def __init__(self, rows: Iterable[ManifestRow], root: Path | str | None = None) -> None:
        self.rows: list[ManifestRow] = sorted(rows, key=lambda r: r.path)
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def category(self) -> str:
        """The one category every row belongs to (a manifest describes one product's dataset)."""
        categories = {r.category for r in self.rows}
        if len(categories) != 1:
            raise DataError(f"a manifest holds one category, this one {sorted(categories) or 'none'}")
        return categories.pop()

    def row_for(self, path: Path | str) -> ManifestRow:
        """The row of an image given by its absolute path (under :attr:`root`) or its relative one."""
        path = Path(path)
        root = self.root
        rel = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.as_posix()
        for r in self.rows:
            if r.path == rel:
                return r
        raise DataError(f"{path}: not an image of this manifest (root {self.root})")

    @property
    def version(self) -> str:
        """sha256 over the sorted (path, sha256, split, label, mask hashes): changes with any file or split."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update("\t".join((r.path, r.sha256, r.split, r.label, ";".join(r.mask_sha256))).encode())
            h.update(b"\n")
        return h.hexdigest()

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of images per (split, label), for logs and the data report."""
        return dict(sorted(Counter((r.split, r.label) for r in self.rows).items()))

    def duplicates(self) -> list[list[str]]:
        """Groups of byte-identical images (by sha256), each group sorted by path."""
        groups: dict[str, list[str]] = defaultdict(list)
        for r in self.rows:
            groups[r.sha256].append(r.path)
        return [g for g in groups.values() if len(g) > 1]

    def samples(self, split: str | None = None, root: Path | str | None = None) -> list[Sample]:
        """Rows of ``split`` (all if None) as :class:`Sample` with absolute paths under ``root``."""
        base = Path(root) if root is not None else self.root
        if base is None:
            raise ValueError("Manifest has no root: pass root= (the dataset folder the paths are relative to)")
        return [
            Sample(base / r.path, r.split, r.label, tuple(base / m for m in r.mask_paths))
            for r in self.rows
            if split is None or r.split == split
        ]

    def probe_images(self, count: int) -> list[Path]:
        """``count`` test images, normal and defective alternating (by path): scores on both sides of a threshold.

        What every step that checks a model's scores against its bundle's scores them on (register, deploy,
        the cluster deploy): chosen here, from the one split, so they are the same images wherever they are read.
        """
        test = self.samples("test")
        good = [s.path for s in test if not s.is_anomalous]
        bad = [s.path for s in test if s.is_anomalous]
        mixed = [p for pair in zip(good, bad, strict=False) for p in pair] + good[len(bad) :] + bad[len(good) :]
        if not mixed:
            raise DataError(f"this manifest of {self.category} has no test images to probe a model with")
        return mixed[: max(1, count)]

    def write(self, path: Path | str) -> None:
        """CSV with a header row, list columns joined with ``;``; written atomically (DVC may watch it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            for r in self.rows:
                w.writerow(
                    ";".join(v) if name in _LIST_COLUMNS else ("" if v is None else v)
                    for name, v in ((c, getattr(r, c)) for c in COLUMNS)
                )
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path | str, root: Path | str | None = None) -> Manifest:
        """Read a manifest written by :meth:`write`; ``root`` is where its relative paths live."""
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = set(COLUMNS) - set(reader.fieldnames or ())
                if missing:
                    raise DataError(f"{path}: not a tfanet manifest (missing columns {sorted(missing)}); rebuild it")
                rows = []
                for i, d in enumerate(reader, start=2):
                    try:
                        rows.append(
                            ManifestRow(
                                path=d["path"],
                                sha256=d["sha256"],
                                category=d["category"],
                                split=d["split"],
                                label=d["label"],
                                defect_type=d["defect_type"] or None,
                                mask_paths=tuple(m for m in d["mask_paths"].split(";") if m),
                                mask_sha256=tuple(m for m in d["mask_sha256"].split(";") if m),
                                width=int(d["width"]),
                                height=int(d["height"]),
                                mode=d["mode"],
                            )
                        )
                    except (TypeError, ValueError) as exc:
                        raise DataError(f"{path}, line {i}: malformed row ({exc}); rebuild the manifest") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read the manifest ({exc.strerror})") from None
        return cls(rows, root)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def build_manifest(
    root: Path | str, category: str, val_fraction: float = 0.1, seed: int = 0, progress: bool = True
) -> Manifest:
    """Discover, read and check every file of ``category``; assign the val split.

    ``val_fraction`` of the normal train images becomes split ``val`` (seeded, by file
    name), unless the dataset ships its own validation normals in ``validation/good``
    next to a ``test/good`` (MVTec LOCO), which then are the val split as published.
    Raises :class:`ManifestError` listing every bad file: unreadable, truncated, not an
    image, more than 8 bits, a mask whose size differs from its image, a mask without an
    image. Empty masks and duplicate images are logged as warnings, not errors (real
    datasets have both; the validation suite decides).
    """
    root = Path(root)
    samples = discover(root, category, seed=seed)
    layout = detect_layout(root, category)

    problems: list[tuple[Path, str]] = []
    sha: dict[Path, str] = {}
    info: dict[Path, tuple[int, int, str, tuple[str, ...]]] = {}
    empty_masks: list[Path] = []
    for s in tqdm(samples, desc=f"reading {category}", unit="img", disable=not progress, leave=False):
        try:
            data = s.path.read_bytes()
            sha[s.path] = hashlib.sha256(data).hexdigest()
            img = open_image(s.path, data)
        except DataError as exc:
            problems.append((s.path, str(exc).removeprefix(f"{s.path}: ")))
            sha.setdefault(s.path, "")
            continue
        except OSError as exc:
            problems.append((s.path, f"cannot read ({exc.strerror})"))
            sha.setdefault(s.path, "")
            continue
        mask_hashes = []
        for m in s.mask_paths:
            try:
                mdata = m.read_bytes()
                mimg = open_mask_image(m, mdata)
            except DataError as exc:
                problems.append((m, str(exc).removeprefix(f"{m}: ")))
                continue
            except OSError as exc:
                problems.append((m, f"cannot read ({exc.strerror})"))
                continue
            mask_hashes.append(hashlib.sha256(mdata).hexdigest())
            if mimg.size != img.size:
                problems.append(
                    (
                        m,
                        f"mask is {mimg.size[0]}x{mimg.size[1]} but its image {s.path.name} is "
                        f"{img.size[0]}x{img.size[1]}: wrong mask for this image?",
                    )
                )
            elif mimg.getbbox() is None:
                empty_masks.append(m)
        info[s.path] = (img.size[0], img.size[1], img.mode, tuple(mask_hashes))

    problems += [
        (m, "mask without an image (no test image with this stem): mislabelled or image missing")
        for m in find_orphan_masks(root, category, samples)
    ]
    if problems:
        raise ManifestError(problems, f"{root / category}: the dataset has unusable files")
    if empty_masks:
        log.warning(
            "%d mask(s) of %s are empty (all zero): pixel metrics ignore them: %s",
            len(empty_masks),
            category,
            ", ".join(m.name for m in empty_masks),
        )

    samples = split_validation(samples, val_fraction, seed, sha)
    rows = []
    for s in samples:
        w, h, mode, mask_sha256 = info[s.path]
        rows.append(
            ManifestRow(
                path=_rel(s.path, root),
                sha256=sha[s.path],
                category=category,
                split=s.split,
                label=s.label,
                defect_type=None if s.label == GOOD else s.label,
                mask_paths=tuple(_rel(m, root) for m in s.mask_paths),
                mask_sha256=mask_sha256,
                width=w,
                height=h,
                mode=mode,
            )
        )
    manifest = Manifest(rows, root)
    dups = manifest.duplicates()
    if dups:
        log.warning("%s: %d group(s) of byte-identical images, e.g. %s", category, len(dups), " = ".join(dups[0]))
    log.info("manifest %s (%s layout): %s, version %s", category, layout, manifest.counts(), manifest.version[:12])
    return manifest
