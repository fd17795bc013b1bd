"""The synthetic MVTec-layout generator: layout, masks, determinism."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from tfanet_core.data import DEFECT_TYPES, DataError, build_manifest, discover, generate

SMALL = dict(size=128, n_train=3, n_test_good=2, n_test_defect_per_type=3)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert generate(out, seed=0, **SMALL) == ["fabric", "bracket"]
    return out


def test_layout_is_mvtec_ad(synth: Path) -> None:
    assert (synth / "README.md").read_text().startswith("# Synthetic")
    for product, kinds in DEFECT_TYPES.items():
        samples = discover(synth, product)
        counts = Counter((s.split, s.label) for s in samples)
        assert counts == {("train", "good"): 3, ("test", "good"): 2, **{("test", k): 3 for k in kinds}}
        assert all(len(s.mask_paths) == 1 for s in samples if s.is_anomalous)
    assert {"scratch", "hole", "stain"} <= set(DEFECT_TYPES["fabric"])
    assert {"missing_part", "misplaced_part"} <= set(DEFECT_TYPES["bracket"])
    manifest = build_manifest(synth, "bracket", progress=False)  # passes every data check
    assert {r.mode for r in manifest.rows} == {"RGB"} and {(r.width, r.height) for r in manifest.rows} == {(128, 128)}


def test_masks_binary_sized_bounded_and_visible(synth: Path) -> None:
    for product, kinds in DEFECT_TYPES.items():
        for kind in kinds:
            centroids = []
            for img_path in sorted((synth / product / "test" / kind).glob("*.png")):
                mask_path = synth / product / "ground_truth" / kind / f"{img_path.stem}_mask.png"
                raw = np.asarray(Image.open(mask_path))
                img = np.asarray(Image.open(img_path), dtype=np.float32) / 255
                assert raw.shape == img.shape[:2] and set(np.unique(raw)) == {0, 255}
                mask = raw > 0
                assert 0.004 <= mask.mean() <= 0.05, (img_path, mask.mean())
                centroids.append(np.argwhere(mask).mean(axis=0))
                if kind in ("scratch", "hole", "stain"):  # locally distinctive: differs from its surroundings
                    ring = binary_dilation(mask, iterations=4) & ~binary_dilation(mask, iterations=1)
                    contrast = np.abs(img[mask].mean(axis=0) - img[ring].mean(axis=0)).max()
                    assert contrast > 0.03, (img_path, contrast)
            spread = np.ptp(np.stack(centroids), axis=0).max()
            assert spread > 5, f"{product}/{kind} defects all at the same place"


def test_same_seed_same_bytes_other_seed_differs(synth: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, seed=0, **SMALL)
    assert _hashes(again) == _hashes(synth)
    generate(again, seed=1, **SMALL)  # re-running over its own output replaces it
    other = _hashes(again)
    assert other.keys() == _hashes(synth).keys()
    same = [k for k, v in other.items() if k.endswith(".png") and _hashes(synth)[k] == v]
    assert not same


def test_train_images_vary_and_files_are_small(synth: Path) -> None:
    for product in DEFECT_TYPES:
        imgs = [
            np.asarray(Image.open(p), np.float32) for p in sorted((synth / product / "train" / "good").glob("*.png"))
        ]
        assert np.abs(imgs[0] - imgs[1]).mean() > 2  # pose/phase/lighting vary, not one image copied
    assert max(p.stat().st_size for p in synth.rglob("*.png")) < 60_000


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "fabric").mkdir()
    (tmp_path / "fabric" / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="not written by tfanet synth"):
        generate(tmp_path, **SMALL)
    assert (tmp_path / "fabric" / "mine.txt").read_text() == "precious"
    with pytest.raises(ValueError):
        generate(tmp_path / "x", size=32)
