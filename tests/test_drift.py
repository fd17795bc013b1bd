"""Drift statistics (error rates under H0, power under shifts, a window check on images) and the retrain decision."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.drift_check import (
    NO_DRIFT,
    RETRAIN_TRIGGERED,
    SUPPRESSED,
    RetrainParams,
    add_images,
    decide,
    list_images,
)
from tfanet_core.config import load_config
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.drift import (
    DriftConfig,
    DriftReport,
    Reference,
    calibrate_null,
    check_window,
    embed,
    mmd_test,
    psi,
    score_shift,
)
from tfanet_core.errors import TfanetError
from tfanet_core.features import FeatureExtractor


def test_mmd_false_alarms_under_h0_are_near_alpha() -> None:
    rng = np.random.default_rng(0)
    p_values = [mmd_test(rng.normal(size=(20, 5)), rng.normal(size=(20, 5)), 99, seed=i)[1] for i in range(40)]
    assert np.mean(np.array(p_values) < 0.05) <= 0.15
    assert 0.2 < np.median(p_values) < 0.8  # roughly uniform, not stuck at 1


def test_mmd_detects_a_mean_shift_and_p_value_is_never_zero() -> None:
    rng = np.random.default_rng(1)
    stat, p = mmd_test(rng.normal(size=(30, 5)), rng.normal(0.8, 1.0, size=(30, 5)), 199, seed=0)
    assert stat > 0
    assert p == pytest.approx(1 / 200)  # every permutation below the observed statistic: the +1 floor


def test_mmd_is_unbiased_and_symmetric_under_h0() -> None:
    rng = np.random.default_rng(2)
    stats = [mmd_test(rng.normal(size=(15, 3)), rng.normal(size=(15, 3)), 20)[0] for _ in range(200)]
    assert abs(np.mean(stats)) < 0.01  # unbiased MMD² has mean 0 under H0 (the biased one is > 0)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(12, 3))
    assert mmd_test(x, y, 20)[0] == pytest.approx(mmd_test(y, x, 20)[0])


def test_mmd_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="equal D"):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))


def test_psi_is_zero_for_identical_distributions_and_grows_with_shift() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=5000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert psi(ref, rng.normal(size=5000)) < 0.02
    small, large = psi(ref, rng.normal(0.3, 1, 5000)), psi(ref, rng.normal(1.0, 1, 5000))
    assert 0.05 < small < large
    assert large > 0.25  # the usual "major shift" rule of thumb


def test_score_shift_reject_rate_binomial() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=200)
    threshold = float(np.quantile(ref, 0.95))
    same = score_shift(ref, rng.normal(size=50), threshold, expected_fpr=0.05)
    shifted = score_shift(ref, rng.normal(1.5, 1, 50), threshold, expected_fpr=0.05)
    assert same.reject_p_value > 0.01 and same.ks_p_value > 0.01
    assert shifted.reject_rate > 0.3
    assert shifted.reject_p_value < 1e-6 and shifted.ks_p_value < 1e-6
    assert score_shift(ref, ref[:50]).reject_rate is None  # no threshold: no reject-rate test


def test_config_from_params_rejects_unknown_and_unreachable_settings() -> None:
    assert DriftConfig.from_dict({"window": 30, "alpha": 0.01, "n_permutations": 400}).window == 30
    with pytest.raises(ValueError, match="unknown key"):
        DriftConfig.from_dict({"windw": 30})
    with pytest.raises(ValueError, match="cannot reach"):
        DriftConfig(alpha=0.01, n_permutations=50)


def test_check_window_combines_tests_with_bonferroni() -> None:
    rng = np.random.default_rng(5)
    ref = Reference(rng.normal(size=(100, 4)), scores=rng.normal(size=60), threshold=1.64, expected_fpr=0.05)
    config = DriftConfig(window=40, n_permutations=200)
    quiet = check_window(ref, rng.normal(size=(40, 4)), rng.normal(size=40), config)
    assert not quiet.drift and set(quiet.p_values) == {"mmd", "ks", "reject_rate"}
    assert quiet.alpha_per_test == pytest.approx(0.05 / 3)
    loud = check_window(ref, rng.normal(size=(40, 4)), rng.normal(2.0, 1, 40), config)
    assert loud.drift and "ks" in loud.reason and "reject_rate" in loud.reason
    assert check_window(ref, rng.normal(size=(40, 4)), None, config).alpha_per_test == pytest.approx(0.05)
    with pytest.raises(ValueError, match="embed the window"):
        check_window(ref, rng.normal(size=(40, 5)), None, config)


def _grouped(rng: np.random.Generator, groups: int, per_group: int = 8, offset: float = 0.0) -> np.ndarray:
    """Images in correlated groups (8 photos per part): a per-part offset, as on KolektorSDD's commutators."""
    centres = rng.normal(size=(groups, 1, 6))
    return (centres + 0.3 * rng.normal(size=(groups, per_group, 6))).reshape(-1, 6) + offset


def test_calibrated_null_tolerates_new_groups_but_flags_a_shift() -> None:
    rng = np.random.default_rng(7)
    config = DriftConfig(window=40, n_permutations=200)
    reference = Reference(_grouped(rng, 30))
    new_parts = _grouped(rng, 5)
    assert check_window(reference, new_parts, None, config).drift  # permutation null: new parts look like drift
    reference.null_mmd2 = calibrate_null(reference, _grouped(rng, 40), config, n_windows=200)
    quiet = [check_window(reference, _grouped(rng, 5), None, config) for _ in range(20)]
    assert sum(r.drift for r in quiet) <= 3  # nominal 5 % of 20 windows = 1
    assert quiet[0].mmd_null.startswith("calibrated")
    shifted = check_window(reference, _grouped(rng, 5, offset=1.5), None, config)
    assert shifted.drift and shifted.p_values["mmd"] < 0.02
    with pytest.raises(ValueError, match="several times the window"):
        calibrate_null(reference, _grouped(rng, 5), config)


def test_reference_round_trips_through_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    ref = Reference(
        rng.normal(size=(10, 3)),
        scores=rng.normal(size=5),
        threshold=0.5,
        expected_fpr=0.02,
        backbone={"tag": "t", "sha256": "abc"},
    )
    loaded = Reference.load(ref.save(tmp_path))
    np.testing.assert_array_equal(loaded.embeddings, ref.embeddings)
    np.testing.assert_array_equal(loaded.scores, ref.scores)
    assert (loaded.threshold, loaded.expected_fpr, loaded.backbone) == (0.5, 0.02, {"tag": "t", "sha256": "abc"})
    ref.null_mmd2 = np.array([0.1, 0.2])
    np.testing.assert_array_equal(Reference.load(ref.save(tmp_path)).null_mmd2, [0.1, 0.2])
    bare = Reference.load(Reference(rng.normal(size=(4, 3))).save(tmp_path / "bare.npz"))
    assert bare.scores is None and bare.threshold is None
    with pytest.raises(TfanetError, match="build one"):
        Reference.load(tmp_path / "missing")


def test_brightness_shift_is_detected_and_fresh_normals_are_not(synth_root: Path) -> None:
    config = load_config("tiny").features
    extractor = FeatureExtractor(config)
    train = sorted((synth_root / "fabric" / "train" / "good").glob("*.png"))
    fresh = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))
    reference = Reference(embed(extractor, train))
    images = torch.stack([image_to_tensor(load_rgb(p), config.image_size) for p in fresh])
    drift_config = DriftConfig(window=len(fresh), n_permutations=200)
    normal = check_window(reference, embed(extractor, images), None, drift_config)
    brighter = check_window(reference, embed(extractor, (images * 1.3).clamp(0, 1)), None, drift_config)
    assert not normal.drift, normal.reason
    assert brighter.drift, brighter.reason
    assert brighter.p_values["mmd"] < 0.01 < normal.p_values["mmd"]


# --- components/drift_check.py: the decision, its reasons, the window's images (no servers) ----------------


def _report(drift: bool) -> DriftReport:
    reason = "drift: mmd below alpha/3=0.0167 (mmd p=0.0020)" if drift else "no drift: every p-value >= alpha/3"
    return DriftReport(drift, reason, 50, 0.05, 0.05 / 3, {"mmd": 0.002 if drift else 0.4}, 0.1, "permutation (500)")


def test_decision_no_drift_never_triggers_even_outside_cooldown() -> None:
    now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
    decision, reason = decide(_report(False), None, now, RetrainParams(cooldown_hours=24))
    assert decision == NO_DRIFT and reason.startswith("no drift")


def test_decision_drift_triggers_outside_cooldown_and_is_suppressed_inside() -> None:
    now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
    params = RetrainParams(cooldown_hours=24, mode="dvc")
    first, reason = decide(_report(True), None, now, params)
    assert first == RETRAIN_TRIGGERED
    assert reason.startswith("drift, retraining via dvc (none before, cooldown 24 h): drift: mmd")

    last = now - dt.timedelta(hours=23, minutes=59)
    inside, reason = decide(_report(True), last, now, params)
    assert inside == SUPPRESSED
    assert reason.startswith(
        "drift, retrain suppressed by cooldown (last at 2026-11-23T12:01:00+00:00, cooldown 24 h, "
        "next allowed after 2026-11-24T12:01:00+00:00): drift: mmd"
    )

    after, reason = decide(_report(True), now - dt.timedelta(hours=24), now, params)
    assert after == RETRAIN_TRIGGERED and "last at 2026-11-23T12:00:00+00:00" in reason
    assert decide(_report(True), now, now, RetrainParams(cooldown_hours=0))[0] == RETRAIN_TRIGGERED


def test_retrain_params_reject_unknown_keys_modes_and_non_s3_datasets() -> None:
    assert RetrainParams.from_params({"cooldown_hours": 2, "mode": "kfp"}).cooldown == dt.timedelta(hours=2)
    with pytest.raises(ValueError, match="unknown key"):
        RetrainParams.from_params({"cooldown": 2})
    with pytest.raises(ValueError, match=r"retrain\.mode"):
        RetrainParams(mode="airflow")
    with pytest.raises(ValueError, match="cooldown_hours"):
        RetrainParams(cooldown_hours=-1)
    with pytest.raises(ValueError, match="s3://"):
        RetrainParams(dataset_uri="/data/synth")


def test_params_yaml_drift_and_retrain_sections_load() -> None:
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert DriftConfig.from_dict(params["drift"]).window == 50
    assert RetrainParams.from_params(params["retrain"]).mode == "dvc"


def test_list_images_sorts_recursively_and_skips_non_images(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/002.png", "001.jpg", "003.PNG", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, tmp_path)] == [
        "001.jpg",
        "003.PNG",
        "b/002.png",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty", tmp_path)
    with pytest.raises(TfanetError, match="no such directory"):
        list_images(tmp_path / "missing", tmp_path)


def test_add_images_writes_new_files_only(tmp_path: Path) -> None:
    src = tmp_path / "window"
    src.mkdir()
    for i, ext in enumerate((".png", ".JPG")):
        (src / f"img{i}{ext}").write_bytes(bytes([i]) * 10)
    good = tmp_path / "data" / "fabric" / "train" / "good"
    good.mkdir(parents=True)
    (good / "000.png").write_bytes(b"old")
    added = add_images(sorted(src.iterdir()), good, "drift-20261124T120000Z")
    assert [p.name for p in added] == ["drift-20261124T120000Z-000.png", "drift-20261124T120000Z-001.jpg"]
    assert added[1].read_bytes() == bytes([1]) * 10 and (good / "000.png").read_bytes() == b"old"
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        add_images(sorted(src.iterdir()), good, "drift-20261124T120000Z")
    assert added[0].read_bytes() == bytes([0]) * 10
