"""Finding the samples of one category in the folder layouts users actually have.

Three layouts are recognised (by the folders present, never by a flag the user must get
right):

* **MVTec AD** — ``CAT/train/good``, ``CAT/test/<type>``,
  ``CAT/ground_truth/<type>/<stem>_mask.png``; optional ``CAT/validation/good``.
* **MVTec LOCO** — as AD, but masks are folders ``ground_truth/<type>/<stem>/*.png`` (one
  PNG per defect, pixel value = defect code) and ``CAT/defects_config.json`` exists.
* **Plain folders** — ``CAT/good/*`` and ``CAT/defect/*``, optional
  ``CAT/masks/<stem>_mask.png``; the good images are split into train/test here.

Where a category has no ``test/good``, its ``validation/good`` images are the normal test
images (docs/architecture.md §Dataset layout; the partial LOCO copy in the shared data needs this). Splits are
decided by hashing file names with a seed, so they do not depend on file-system order and
adding one image moves at most one other image across the split boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tfanet_core.data.images import IMAGE_EXTENSIONS, DataError

__all__ = [
    "GOOD",
    "LAYOUTS",
    "SPLITS",
    "Sample",
    "detect_layout",
    "discover",
    "find_orphan_masks",
    "load_defects_config",
    "split_validation",
]

log = logging.getLogger(__name__)

GOOD = "good"
SPLITS = ("train", "val", "test")
LAYOUTS = ("mvtec_ad", "mvtec_loco", "folders")
_EXTS = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class Sample:
    """One image of a category: where it is, which split it belongs to, and its masks."""

    path: Path
    split: str  # "train" | "val" | "test"
    label: str  # "good" or the defect type
    mask_paths: tuple[Path, ...] = ()

    @property
    def is_anomalous(self) -> bool:
        return self.label != GOOD


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (sorted); anything else is reported once and ignored."""
    if not folder.is_dir():
        return []
    images, stray = [], []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            stray.append(p.name + ("/" if p.is_dir() else ""))
    if stray:
        shown = ", ".join(stray[:5]) + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
        log.warning(
            "ignoring %d non-image entr%s in %s: %s (images are: %s)",
            len(stray),
            "y" if len(stray) == 1 else "ies",
            folder,
            shown,
            _EXTS,
        )
    return images


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def _rank_key(seed: int, path: Path) -> tuple[str, str]:
    """Seeded pseudo-random but root-independent order: hash of ``parent/name`` (not the absolute path)."""
    rel = "/".join(path.parts[-2:])
    return hashlib.sha256(f"{seed}\0{rel}".encode()).hexdigest(), rel


def _pick(paths: Sequence[Path], fraction: float, seed: int) -> set[Path]:
    """A deterministic ``fraction`` of ``paths`` (at least one when fraction > 0, never all)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(paths)
    k = round(n * fraction)
    # At least one when asked for any (tiny categories), and never every image.
    k = min(max(k, 1), n - 1) if fraction > 0 and n >= 2 else min(k, max(n - 1, 0))
    return set(sorted(paths, key=lambda p: _rank_key(seed, p))[:k])


def detect_layout(root: Path | str, category: str) -> str:
    """``"mvtec_ad"``, ``"mvtec_loco"`` or ``"folders"``; DataError if none fits."""
    cat = Path(root) / category
    if not cat.is_dir():
        found = sorted(p.name for p in _subdirs(Path(root)))
        raise DataError(f"{cat}: no such category folder; categories under {root}: {', '.join(found) or 'none'}")
    if (cat / "train").is_dir() or (cat / "test").is_dir():
        gt = cat / "ground_truth"
        if (cat / "defects_config.json").is_file() or any(_subdirs(t) for t in _subdirs(gt)):
            return "mvtec_loco"
        return "mvtec_ad"
    if (cat / GOOD).is_dir():
        return "folders"
    raise DataError(
        f"{cat}: unrecognised layout; expected {cat}/train/good + {cat}/test/<type> (MVTec AD/LOCO) "
        f"or {cat}/good + {cat}/defect (plain folders)"
    )


class _MaskIndex:
    """Mask files of one defect-type folder, listed once (not one stat per image)."""

    def __init__(self, folder: Path) -> None:
        self.by_stem: dict[str, list[Path]] = {}
        if not folder.is_dir():
            return
        for p in sorted(folder.iterdir()):
            if p.is_dir():  # LOCO: ground_truth/<type>/<stem>/*.png, one file per defect
                files = _list_images(p)
                self.by_stem.setdefault(p.name, []).extend(files)
            elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.endswith("_mask"):
                self.by_stem.setdefault(p.stem[: -len("_mask")], []).append(p)

    def masks(self, image: Path) -> tuple[Path, ...]:
        return tuple(sorted(self.by_stem.get(image.stem, [])))


def _require_masks(samples: Iterable[Sample], mask_dir: Path) -> None:
    missing = [s.path for s in samples if s.is_anomalous and not s.mask_paths]
    if missing:
        listing = "\n  ".join(str(p) for p in missing)
        raise DataError(
            f"{len(missing)} defect image(s) have no mask although {mask_dir} exists; add "
            f"<type>/<stem>_mask.png (or <type>/<stem>/*.png for LOCO) or move the image out:\n  {listing}"
        )


def _discover_mvtec(cat: Path, layout: str) -> list[Sample]:
    samples: list[Sample] = []
    train_dir = cat / "train"
    for d in _subdirs(train_dir):
        if d.name != GOOD:
            log.warning("ignoring %s: training uses normal images (train/good) only", d)
    samples += [Sample(p, "train", GOOD) for p in _list_images(train_dir / GOOD)]

    test_dir = cat / "test"
    for p in test_dir.iterdir() if test_dir.is_dir() else ():
        if p.is_file():
            log.warning("ignoring %s: test images belong in test/<type>/", p)
    has_test_good = bool(_list_images(test_dir / GOOD))
    val_good = _list_images(cat / "validation" / GOOD)
    if val_good and not has_test_good:
        log.info(
            "%s has no test/good: its %d validation/good images serve as the normal test images", cat, len(val_good)
        )
    samples += [Sample(p, "val" if has_test_good else "test", GOOD) for p in val_good]

    gt = cat / "ground_truth"
    for d in _subdirs(test_dir):
        index = _MaskIndex(gt / d.name)
        for p in _list_images(d):
            masks = () if d.name == GOOD else index.masks(p)
            samples.append(Sample(p, "test", d.name, masks))
    if gt.is_dir():
        _require_masks(samples, gt)
    if not any(s.split == "test" and not s.is_anomalous for s in samples):
        log.warning("%s: no normal test images (test/good or validation/good): image AUROC is undefined", cat)
    log.info("%s: %s layout", cat, layout)
    return samples


def _discover_folders(cat: Path, test_fraction: float, seed: int) -> list[Sample]:
    good = _list_images(cat / GOOD)
    defect_dir = cat / "defect"
    for d in _subdirs(defect_dir):
        log.warning("ignoring %s: plain-folder layout reads images directly in defect/", d)
    index = _MaskIndex(cat / "masks")
    test_good = _pick(good, test_fraction, seed)
    samples = [Sample(p, "test" if p in test_good else "train", GOOD) for p in good]
    samples += [Sample(p, "test", "defect", index.masks(p)) for p in _list_images(defect_dir)]
    if (cat / "masks").is_dir():
        _require_masks(samples, cat / "masks")
    return samples


def discover(root: Path | str, category: str, *, plain_test_fraction: float = 0.2, seed: int = 0) -> list[Sample]:
    """All samples of ``category`` under ``root``, layout auto-detected (see module docstring).

    ``plain_test_fraction`` and ``seed`` only matter for the plain-folder layout, whose
    good images have no train/test split of their own. Raises :class:`DataError` for an
    unknown layout, a category without training images, or a defect image without masks
    where the category has masks at all.
    """
    root = Path(root)
    cat = root / category
    layout = detect_layout(root, category)
    samples = _discover_folders(cat, plain_test_fraction, seed) if layout == "folders" else _discover_mvtec(cat, layout)
    if not any(s.split == "train" for s in samples):
        where = cat / GOOD if layout == "folders" else cat / "train" / GOOD
        raise DataError(f"{where}: no training images found (looked for {_EXTS}); put the normal images there")
    return samples


def split_validation(
    samples: Sequence[Sample], fraction: float, seed: int, sha256: Mapping[Path, str] | None = None
) -> list[Sample]:
    """The one rule that decides which normal images are held out (split ``"val"``); nothing else splits.

    These held-out normals select the model and calibrate the threshold, so they must never be
    trained on. Validation normals the dataset ships (MVTec LOCO's ``validation/good``) are kept
    as published and ``fraction`` is ignored; otherwise a deterministic ``fraction`` of the normal
    train images moves to val, chosen from ``seed`` and file names only (not the order of
    ``samples`` or the absolute root), keeping at least one training image. With ``sha256``
    (path → content hash), every training copy of a byte-identical held-out image moves to val
    too, so no image is both trained on and held out (KolektorSDD duplicates whole items).
    """
    if any(s.split == "val" for s in samples):
        if fraction:
            log.info("the dataset ships validation/good: using it as the val split, val_fraction ignored")
        out = list(samples)
    else:
        train = [s.path for s in samples if s.split == "train" and not s.is_anomalous]
        chosen = _pick(train, fraction, seed)
        out = [replace(s, split="val") if s.path in chosen and s.split == "train" else s for s in samples]
    if sha256 is not None:
        held_out = {sha256[s.path] for s in out if s.split == "val"}
        out = [replace(s, split="val") if s.split == "train" and sha256[s.path] in held_out else s for s in out]
    return out


def load_defects_config(root: Path | str, category: str) -> list[dict[str, Any]] | None:
    """The parsed ``defects_config.json`` of a LOCO category (defect codes, saturation areas), else None."""
    path = Path(root) / category / "defects_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable defects config ({exc}); restore it from the MVTec LOCO download") from None
    if not isinstance(config, list) or not all(isinstance(d, dict) and "pixel_value" in d for d in config):
        raise DataError(f"{path}: expected a JSON list of objects with 'pixel_value'; restore the original file")
    return config


def find_orphan_masks(root: Path | str, category: str, samples: Iterable[Sample]) -> list[Path]:
    """Mask files that belong to no sample (a mask without its image is a mislabelled dataset)."""
    cat = Path(root) / category
    used = {m for s in samples for m in s.mask_paths}
    orphans = []
    for mask_dir in (cat / "ground_truth", cat / "masks"):
        if not mask_dir.is_dir():
            continue
        for p in sorted(mask_dir.rglob("*")):
            rel = p.relative_to(mask_dir).parts
            if rel[0] == GOOD or any(part.startswith(".") for part in rel):
                continue  # masks of good images (some datasets ship blank ones) are harmless
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p not in used:
                orphans.append(p)
    return orphans
