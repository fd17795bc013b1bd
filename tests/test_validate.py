"""The great-expectations dataset gate: a clean dataset passes, every kind of corruption is named with its path."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from components.validate import ValidationFailed, ValidationRules, manifest_frame, validate_manifest
from tfanet_core.data.manifest import Manifest, build_manifest


@pytest.fixture
def fabric_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic fabric product (the session dataset must never be corrupted)."""
    root = tmp_path / "data"
    shutil.copytree(synth_root / "fabric", root / "fabric")
    return root


def _checks(exc: ValidationFailed) -> dict[str, list[str]]:
    return {p.check: [where for where, _ in p.rows] for p in exc.report.errors}


def test_clean_dataset_passes_and_writes_data_docs(fabric_copy: Path, tmp_path: Path) -> None:
    manifest = build_manifest(fabric_copy, "fabric", progress=False)
    docs = tmp_path / "docs"
    rules = ValidationRules(
        allowed_labels=("good", "scratch", "hole", "stain"),
        allowed_modes=("RGB", "L"),
        image_size=(128, 128),
        min_counts={"train": 10, "val": 1, "test_good": 5, "test_defect": 5},
    )
    report = validate_manifest(manifest, rules=rules, docs_dir=docs, progress=False)
    assert report.success and report.problems == []
    assert report.n_images == len(manifest) and report.manifest_version == manifest.version
    assert report.evaluated == 25  # 20 manifest checks + labels, modes, width, height + split counts
    index = (docs / "index.html").read_text()
    assert "tfanet_manifest" in index and "tfanet_split_counts" in index
    assert len(list((docs / "validations").rglob("*.html"))) == 2
    assert json.loads((docs / "validation.json").read_text())["success"] is True


def test_corrupted_dataset_is_stopped_with_each_problem_named(fabric_copy: Path, tmp_path: Path) -> None:
    cat = fabric_copy / "fabric"
    shutil.copy(cat / "train" / "good" / "003.png", cat / "test" / "good" / "099.png")  # leak train → test
    manifest = build_manifest(fabric_copy, "fabric", progress=False)
    truncated = cat / "test" / "hole" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    docs = tmp_path / "docs"

    with pytest.raises(ValidationFailed) as info:
        validate_manifest(manifest, docs_dir=docs, progress=False)

    checks = _checks(info.value)
    assert set(checks) == {"readable", "unchanged", "masks", "leakage"}
    assert checks["readable"] == ["fabric/test/hole/000.png"]
    assert checks["masks"] == ["fabric/test/scratch/001.png"]
    assert sorted(checks["leakage"]) == ["fabric/test/good/099.png", "fabric/train/good/003.png"]
    message = str(info.value)
    assert "fabric/test/hole/000.png: corrupt or truncated PNG" in message
    assert "mask fabric/ground_truth/scratch/001_mask.png is missing" in message
    assert "fabric/test/good/099.png: same bytes as fabric/train/good/003.png (train)" in message
    assert "leakage" in message and str(docs / "index.html") in message
    # The report survives the failure: Data Docs and the JSON summary are written before raising.
    assert (docs / "index.html").is_file()
    saved = json.loads((docs / "validation.json").read_text())
    assert saved["success"] is False and {p["check"] for p in saved["problems"]} == set(checks)


def test_manifest_declarations_are_checked_against_the_files(fabric_copy: Path) -> None:
    manifest = build_manifest(fabric_copy, "fabric", progress=False)
    rows = list(manifest.rows)
    defect = next(i for i, r in enumerate(rows) if r.label == "stain")
    good = next(i for i, r in enumerate(rows) if r.split == "train")
    rows[good] = replace(rows[good], width=64, mode="L")
    rows[defect] = replace(rows[defect], mask_paths=(), mask_sha256=())
    bad = Manifest(rows, fabric_copy)
    with pytest.raises(ValidationFailed) as info:
        validate_manifest(bad, progress=False)
    checks = _checks(info.value)
    assert set(checks) == {"width", "mode", "masks"}
    assert checks["width"] == checks["mode"] == [rows[good].path]
    assert checks["masks"] == [rows[defect].path]
    message = str(info.value)
    assert f"{rows[good].path}: 128 px wide, the manifest says 64" in message
    assert f"{rows[defect].path}: defect image without a mask" in message


def test_rules_duplicates_within_a_split_and_minimum_counts(fabric_copy: Path) -> None:
    cat = fabric_copy / "fabric"
    shutil.copy(cat / "test" / "good" / "001.png", cat / "test" / "good" / "098.png")
    manifest = build_manifest(fabric_copy, "fabric", progress=False)

    report = validate_manifest(manifest, progress=False)  # a duplicate inside one split: a warning only
    assert report.success
    assert [(p.check, p.severity, len(p.rows)) for p in report.problems] == [("duplicates", "warning", 2)]

    strict = ValidationRules(duplicates_within_split="error", min_counts={"train": 1000, "test_defect": 1})
    with pytest.raises(ValidationFailed) as info:
        validate_manifest(manifest, rules=strict, progress=False)
    checks = _checks(info.value)
    assert set(checks) == {"duplicates", "split_counts"}
    assert checks["split_counts"] == ["train"]
    assert f"train: {sum(r.split == 'train' for r in manifest.rows)} image(s), minimum 1000" in str(info.value)


def test_manifest_frame_has_the_measured_columns(fabric_copy: Path) -> None:
    manifest = build_manifest(fabric_copy, "fabric", progress=False)
    frame = manifest_frame(manifest, progress=False)
    assert len(frame) == len(manifest)
    assert frame["readable"].all() and frame["masks_ok"].all()
    assert (frame["actual_sha256"] == frame["sha256"]).all()
    assert (frame["actual_width"] == frame["width"]).all()
    defects = frame[frame["label"] != "good"]
    assert (defects["n_masks"] == 1).all() and (frame[frame["label"] == "good"]["n_masks"] == 0).all()
    assert (frame["n_splits_of_sha256"] == 1).all()


def test_rules_from_params() -> None:
    rules = ValidationRules.from_params({"allowed_labels": ["good", "hole"], "image_size": [256, 256]})
    assert rules.allowed_labels == ("good", "hole") and rules.image_size == (256, 256)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['allowed_label'\] in params.yaml 'validate'"):
        ValidationRules.from_params({"allowed_label": ["good"]})
    with pytest.raises(ValueError, match="min_counts keys"):
        ValidationRules(min_counts={"training": 1})
    with pytest.raises(ValueError, match="duplicates_within_split"):
        ValidationRules(duplicates_within_split="ignore")
