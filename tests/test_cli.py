"""The command line contract of docs/architecture.md §Command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tfanet_core import cli
from tfanet_core.bundle import load_bundle
from tfanet_core.cli import main


def test_info_json_reports_counts_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--profile", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["paper_count"] == info["parameters"]["backbone"] + info["parameters"]["trainable"] - 64
    assert info["cost_per_image"]["gmacs"] == pytest.approx(info["cost_per_image"]["gflops"] / 2)


def test_train_then_predict_prints_one_json_object_per_image(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    args = ["train", "--data", str(synth_root), "--category", "bracket", "--out", str(bundle), "--profile", "tiny"]
    assert main([*args, "--set", "train.epochs=2", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    image = load_bundle(bundle).thresholds["image"]
    assert summary["profile"] == "tiny" and summary["image_threshold"] == image.value
    # what the threshold guarantees, as the bundle records it, in the JSON and in the sentence for people
    assert summary["fpr_upper_bound"] == image.fpr_upper_bound and summary["normals_needed"] == image.normals_needed
    assert f"<= {image.fpr_upper_bound:.1%} (95 % confidence, exact binomial)" in out.err

    folder = synth_root / "bracket" / "test" / "scratch"
    assert main(["predict", "--bundle", str(bundle), str(folder), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == len(list(folder.glob("*.png")))
    assert set(rows[0]) == {"path", "score", "threshold", "is_anomalous", "templates"}
    assert rows[0]["templates"] == [load_bundle(bundle).template["image"]]  # the one template it was compared with
    assert all(r["is_anomalous"] == (r["score"] > r["threshold"]) for r in rows)


def test_user_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--bundle", str(tmp_path), str(tmp_path / "x.png")]) == 2
    assert "not a tfanet bundle" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--category", "nothing", "--out", str(tmp_path / "b")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["info", "--set", "model.embed_dim=30"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only TfanetError is the user's to fix; anything else propagates with its traceback (exit 1)."""

    def buggy(args: object) -> int:
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(cli, "cmd_info", buggy)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["info", "--profile", "tiny"])
