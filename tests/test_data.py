"""Reading images/masks, finding samples, and the manifest: every bad input names its file."""

from __future__ import annotations

import logging
import os
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfanet_core.data import (
    DataError,
    Manifest,
    ManifestError,
    Sample,
    build_manifest,
    detect_layout,
    discover,
    image_to_tensor,
    load_defects_config,
    load_mask,
    load_rgb,
    mask_to_array,
    mask_to_tensor,
    split_validation,
)

SHARED_DATA = Path(os.environ.get("TFANET_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------- helpers
def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _rgb(path: Path, value: int = 128, size: tuple[int, int] = (48, 36)) -> Path:
    """An RGB PNG of (H, W) = size whose pixels depend on ``value`` (so hashes differ)."""
    rng = np.random.default_rng(value)
    return _png(path, rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _mask(path: Path, size: tuple[int, int] = (48, 36), value: int = 255, box=(2, 2, 6, 6)) -> Path:
    m = np.zeros(size, np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = value
    return _png(path, m)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_rgb16(path: Path, w: int = 40, h: int = 36) -> Path:
    """A valid 16-bit-per-channel RGB PNG, written by hand (Pillow reads it as 8-bit RGB without a word)."""
    raw = b"".join(b"\x00" + bytes(6 * w) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return path


def _mvtec(root: Path, cat: str = "widget", n_train: int = 6, n_good: int = 2, n_defect: int = 2) -> Path:
    """A tiny MVTec AD category: train/good, test/good, test/scratch with masks."""
    c = root / cat
    for i in range(n_train):
        _rgb(c / "train" / "good" / f"{i:03d}.png", i)
    for i in range(n_good):
        _rgb(c / "test" / "good" / f"{i:03d}.png", 100 + i)
    for i in range(n_defect):
        _rgb(c / "test" / "scratch" / f"{i:03d}.png", 200 + i)
        _mask(c / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return c


def _loco(root: Path, cat: str = "bottle", with_test_good: bool = False) -> Path:
    c = root / cat
    for i in range(4):
        _rgb(c / "train" / "good" / f"{i:03d}.png", i)
    for i in range(3):
        _rgb(c / "validation" / "good" / f"{i:03d}.png", 50 + i)
    if with_test_good:
        _rgb(c / "test" / "good" / "000.png", 70)
    _rgb(c / "test" / "logical_anomalies" / "000.png", 90)
    _mask(c / "ground_truth" / "logical_anomalies" / "000" / "000.png", value=255, box=(0, 0, 3, 3))
    _mask(c / "ground_truth" / "logical_anomalies" / "000" / "001.png", value=253, box=(10, 8, 14, 12))
    (c / "defects_config.json").write_text('[{"defect_name": "missing_cap", "pixel_value": 255}]')
    return c


# --------------------------------------------------------------------------- images
def test_grayscale_palette_and_rgba_become_rgb(tmp_path: Path) -> None:
    levels = np.zeros((36, 40), np.uint8)
    levels[2, 3] = 220
    img = load_rgb(_png(tmp_path / "g.png", levels))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (36, 40, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and arr[2, 3, 0] == 220

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    assert np.asarray(load_rgb(_png(tmp_path / "a.png", rgba)))[0, 0].tolist() == [200, 0, 0]

    pal = Image.new("P", (32, 32))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_rgb(tmp_path / "p.png"))[1, 1].tolist() == [10, 20, 30]


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpg", "not_an_image", "empty", "png16", "rgb16"])
def test_bad_image_raises_data_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    if kind == "truncated_png":
        good = _rgb(tmp_path / "ok.png", size=(64, 64))
        path = tmp_path / "bad.png"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "truncated_jpg":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "ok.jpg")
        path = tmp_path / "bad.jpg"
        path.write_bytes((tmp_path / "ok.jpg").read_bytes()[:600])
    elif kind == "not_an_image":
        path = tmp_path / "notes.png"
        path.write_text("this is a text file with a .png name")
    elif kind == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    elif kind == "png16":
        path = _png(tmp_path / "deep.png", np.full((4, 4), 40000, np.uint16))
    else:
        path = _png_rgb16(tmp_path / "deep_rgb.png")
    with pytest.raises(DataError) as err:
        load_rgb(path)
    assert str(path) in str(err.value)
    if kind in ("png16", "rgb16"):
        assert "8-bit" in str(err.value) and "Convert" in str(err.value)


def test_load_mask_unions_every_loco_mask_file(tmp_path: Path) -> None:
    a = _mask(tmp_path / "000.png", value=255, box=(0, 0, 2, 2))
    b = _mask(tmp_path / "001.png", value=253, box=(10, 10, 12, 12))  # a defect code, not 255
    m = load_mask([a, b])
    assert m.dtype == bool and m.shape == (48, 36)
    assert m.sum() == 8 and m[0, 0] and m[11, 11]
    assert load_mask([a]).sum() == 4  # reading only the first file would lose the second defect


def test_load_mask_rgb_channels_and_resize(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0, 2] = 7  # only the blue channel is set
    m = load_mask([_png(tmp_path / "m.png", rgb)])
    assert m[0, 0] and m.sum() == 1
    big = _mask(tmp_path / "big.png", size=(8, 8), box=(0, 0, 4, 8))  # top half
    small = load_mask([big], size=(4, 2))
    assert small.shape == (4, 2) and small[:2].all() and not small[2:].any()


def test_masks_of_different_sizes_are_an_error(tmp_path: Path) -> None:
    a = _mask(tmp_path / "a.png", size=(8, 8))
    b = _mask(tmp_path / "b.png", size=(9, 8))
    with pytest.raises(DataError, match=r"b\.png"):
        load_mask([a, b])


def test_tensors_are_unnormalized_and_sized(tmp_path: Path) -> None:
    white = Image.new("L", (40, 20), 255)
    x = image_to_tensor(white, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    rnd = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    y = image_to_tensor(rnd, 24)
    assert y.min() >= 0.0 and y.max() <= 1.0 and 0.3 < y.mean() < 0.7
    m = np.zeros((10, 10), bool)
    m[:5] = True
    t = mask_to_tensor(m, 4)
    assert t.shape == (4, 4) and t.dtype == torch.bool and t[:2].all() and not t[2:].any()
    assert mask_to_array(m, (20, 6)).shape == (20, 6)


# --------------------------------------------------------------------------- layouts
def test_discover_mvtec_ad_and_ignore_stray_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = _mvtec(tmp_path)
    (c / "train" / "good" / ".DS_Store").write_bytes(b"\0\1")
    (c / "train" / "good" / "Thumbs.db").write_bytes(b"\0\1")
    with caplog.at_level(logging.WARNING):
        samples = discover(tmp_path, "widget")
    assert detect_layout(tmp_path, "widget") == "mvtec_ad"
    counts = Counter((s.split, s.label) for s in samples)
    assert counts == {("train", "good"): 6, ("test", "good"): 2, ("test", "scratch"): 2}
    assert "Thumbs.db" in caplog.text and ".DS_Store" in caplog.text
    defects = [s for s in samples if s.is_anomalous]
    assert all(s.mask_paths == (c / "ground_truth" / "scratch" / f"{s.path.stem}_mask.png",) for s in defects)
    assert not any(s.is_anomalous for s in samples if s.label == "good")


def test_defect_image_without_mask_is_named(tmp_path: Path) -> None:
    c = _mvtec(tmp_path)
    _rgb(c / "test" / "scratch" / "007.png", 7)
    with pytest.raises(DataError) as err:
        discover(tmp_path, "widget")
    assert str(c / "test" / "scratch" / "007.png") in str(err.value)
    assert "000.png" not in str(err.value)


def test_empty_category_says_where_it_looked(tmp_path: Path) -> None:
    c = _mvtec(tmp_path, n_train=0)
    (c / "train" / "good").mkdir(parents=True)
    (c / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no training images") as err:
        discover(tmp_path, "widget")
    assert str(c / "train" / "good") in str(err.value)
    with pytest.raises(DataError, match="no such category"):
        discover(tmp_path, "gadget")


def test_loco_uses_validation_good_as_test_when_no_test_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _loco(tmp_path)
    with caplog.at_level(logging.INFO):
        samples = discover(tmp_path, "bottle")
    assert detect_layout(tmp_path, "bottle") == "mvtec_loco"
    assert "serve as the normal test images" in caplog.text
    counts = Counter((s.split, s.label) for s in samples)
    assert counts == {("train", "good"): 4, ("test", "good"): 3, ("test", "logical_anomalies"): 1}
    (defect,) = [s for s in samples if s.is_anomalous]
    assert [p.name for p in defect.mask_paths] == ["000.png", "001.png"]
    assert load_mask(list(defect.mask_paths)).sum() == 9 + 16
    assert load_defects_config(tmp_path, "bottle") == [{"defect_name": "missing_cap", "pixel_value": 255}]
    assert load_defects_config(tmp_path.parent, tmp_path.name) is None


def test_loco_with_test_good_keeps_validation_as_val(tmp_path: Path) -> None:
    _loco(tmp_path, with_test_good=True)
    counts = Counter((s.split, s.label) for s in discover(tmp_path, "bottle"))
    assert counts[("val", "good")] == 3 and counts[("test", "good")] == 1


def test_plain_folders_split_deterministically(tmp_path: Path) -> None:
    c = tmp_path / "part"
    for i in range(10):
        _rgb(c / "good" / f"g{i}.png", i)
    _rgb(c / "defect" / "d0.png", 99)
    _mask(c / "masks" / "d0_mask.png")
    a = discover(tmp_path, "part")
    b = discover(tmp_path, "part")
    assert a == b and detect_layout(tmp_path, "part") == "folders"
    counts = Counter((s.split, s.label) for s in a)
    assert counts == {("train", "good"): 8, ("test", "good"): 2, ("test", "defect"): 1}
    assert [s.mask_paths for s in a if s.is_anomalous] == [(c / "masks" / "d0_mask.png",)]
    (c / "masks" / "d0_mask.png").unlink()
    with pytest.raises(DataError, match=r"d0\.png"):
        discover(tmp_path, "part")


def test_split_validation_deterministic_disjoint_and_order_free(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / "cat" / "train" / "good" / f"{i:03d}.png", "train", "good") for i in range(40)]
    samples.append(Sample(tmp_path / "cat" / "test" / "bad" / "000.png", "test", "bad", (tmp_path / "m.png",)))
    a = split_validation(samples, 0.25, seed=3)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    b = split_validation(shuffled, 0.25, seed=3)
    val_a = {s.path for s in a if s.split == "val"}
    train_a = {s.path for s in a if s.split == "train"}
    assert len(val_a) == 10 and len(train_a) == 30 and not val_a & train_a
    assert val_a == {s.path for s in b if s.split == "val"}  # filesystem order does not matter
    assert a[-1] == samples[-1]  # test samples untouched
    other = split_validation(samples, 0.25, seed=4)
    assert {s.path for s in other if s.split == "val"} != val_a
    moved = [Sample(Path("/elsewhere") / s.path.relative_to(tmp_path), s.split, s.label) for s in samples]
    val_moved = {s.path.name for s in split_validation(moved, 0.25, seed=3) if s.split == "val"}
    assert val_moved == {p.name for p in val_a}  # independent of where the dataset root is
    with pytest.raises(ValueError):
        split_validation(samples, 1.0, seed=0)


# --------------------------------------------------------------------------- manifest
def test_manifest_roundtrip_and_samples(tmp_path: Path) -> None:
    _mvtec(tmp_path, n_train=10)
    m = build_manifest(tmp_path, "widget", val_fraction=0.2, seed=0, progress=False)
    assert len(m) == 14
    assert m.counts() == {("test", "good"): 2, ("test", "scratch"): 2, ("train", "good"): 8, ("val", "good"): 2}
    row = next(r for r in m.rows if r.label == "scratch")
    assert row.path.startswith("widget/test/scratch/") and row.defect_type == "scratch"
    assert row.mask_paths == (f"widget/ground_truth/scratch/{Path(row.path).stem}_mask.png",)
    assert (row.width, row.height, row.mode) == (36, 48, "RGB") and len(row.sha256) == 64
    m.write(tmp_path / "out" / "manifest.csv")
    back = Manifest.read(tmp_path / "out" / "manifest.csv", root=tmp_path)
    assert back.rows == m.rows and back.version == m.version
    val = back.samples("val")
    assert len(val) == 2 and all(s.path.is_absolute() and s.path.is_file() for s in val)
    assert {s.split for s in back.samples()} == {"train", "val", "test"}
    with pytest.raises(ValueError, match="root"):
        Manifest.read(tmp_path / "out" / "manifest.csv").samples("train")


def test_manifest_version_changes_with_file_content_and_split(tmp_path: Path) -> None:
    _mvtec(tmp_path, n_train=10)
    v0 = build_manifest(tmp_path, "widget", progress=False).version
    assert build_manifest(tmp_path, "widget", progress=False).version == v0
    assert build_manifest(tmp_path, "widget", seed=5, val_fraction=0.3, progress=False).version != v0
    _rgb(tmp_path / "widget" / "train" / "good" / "003.png", 12345)
    v1 = build_manifest(tmp_path, "widget", progress=False).version
    assert v1 != v0
    _mask(tmp_path / "widget" / "ground_truth" / "scratch" / "000_mask.png", box=(0, 0, 9, 9))
    assert build_manifest(tmp_path, "widget", progress=False).version != v1  # re-annotated mask


def test_manifest_reports_every_bad_file_at_once(tmp_path: Path) -> None:
    c = _mvtec(tmp_path, n_train=6)
    trunc = c / "train" / "good" / "001.png"
    trunc.write_bytes(_rgb(tmp_path / "big.png", size=(64, 64)).read_bytes()[:300])
    text = c / "train" / "good" / "002.png"
    text.write_text("not an image")
    deep = _png(c / "test" / "good" / "000.png", np.full((48, 36), 999, np.uint16))
    wrong = _mask(c / "ground_truth" / "scratch" / "001_mask.png", size=(20, 36))
    orphan = _mask(c / "ground_truth" / "scratch" / "042_mask.png")
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path, "widget", progress=False)
    msg = str(err.value)
    for path in (trunc, text, deep, wrong, orphan):
        assert str(path) in msg
    assert {p for p, _ in err.value.problems} == {trunc, text, deep, wrong, orphan}
    assert "8-bit" in msg and "mask without an image" in msg and "36x20" in msg


def test_manifest_keeps_byte_identical_copies_in_one_split(tmp_path: Path) -> None:
    c = _mvtec(tmp_path, n_train=20)
    for i in range(20):  # every train image has a twin, like KolektorSDD's kos26 = kos01
        (c / "train" / "good" / f"twin_{i:03d}.png").write_bytes((c / "train" / "good" / f"{i:03d}.png").read_bytes())
    m = build_manifest(tmp_path, "widget", val_fraction=0.1, progress=False)
    split_of = {r.path: r.split for r in m.rows}
    for i in range(20):
        assert split_of[f"widget/train/good/{i:03d}.png"] == split_of[f"widget/train/good/twin_{i:03d}.png"]
    assert len(m.duplicates()) == 20 and m.counts()[("val", "good")] >= 4


# --------------------------------------------------------------------------- real data
def _real(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set TFANET_SHARED_DATA to the shared data folder)")
    return path


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("root", "category", "expected"),
    [
        ("", "kolektorsdd", {("train", "good"): 245, ("test", "good"): 103, ("test", "defect"): 52}),
        (
            "",
            "magnetic_tile",
            {
                ("train", "good"): 100,
                ("test", "good"): 60,
                ("test", "blowhole"): 115,
                ("test", "break"): 85,
                ("test", "crack"): 57,
                ("test", "fray"): 32,
                ("test", "uneven"): 103,
            },
        ),
        (
            "mvtec_loco",
            "juice_bottle",
            {("train", "good"): 100, ("test", "good"): 54, ("test", "logical_anomalies"): 142},
        ),
    ],
)
def test_discover_counts_on_real_data(root: str, category: str, expected: dict[tuple[str, str], int]) -> None:
    base = _real(root, category).parent
    samples = discover(base, category)
    assert Counter((s.split, s.label) for s in samples) == expected
    assert all(s.mask_paths for s in samples if s.is_anomalous)
    assert detect_layout(base, category) == ("mvtec_loco" if root else "mvtec_ad")


@pytest.mark.realdata
def test_real_loco_masks_and_defects_config() -> None:
    base = _real("mvtec_loco", "juice_bottle").parent
    defects = [s for s in discover(base, "juice_bottle") if s.is_anomalous]
    mask = load_mask(list(defects[0].mask_paths))
    img = load_rgb(defects[0].path)
    assert mask.shape == (img.height, img.width) and mask.any()
    config = load_defects_config(base, "juice_bottle")
    assert config is not None and {d["pixel_value"] for d in config} >= {255, 254, 253}
