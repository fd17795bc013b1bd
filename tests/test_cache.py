"""Feature cache: a warm run computes nothing, broken entries are recomputed, writers never expose half files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tfanet_core.cache import (
    FeatureCache,
    default_cache_dir,
    entry_key,
    parse_size,
    resolve_cache_dir,
)
from tfanet_core.cli import main
from tfanet_core.config import Config, load_config
from tfanet_core.data.manifest import build_manifest
from tfanet_core.features import FeatureExtractor, cache_namespace, extract_features
from tfanet_core.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(load_config("tiny").features)


@pytest.fixture(scope="module")
def train_paths(synth_root: Path) -> list[Path]:
    """The fabric training images as the manifest lists them (the data step's output)."""
    manifest = build_manifest(synth_root, "fabric", progress=False)
    return [s.path for s in manifest.samples("train")][:16]


class ForwardCounter:
    """Counts real backbone forward passes with a hook, independent of the cache's own stats."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.calls = 0
        self.images = 0
        self.handle = extractor.backbone.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> None:
        self.calls += 1
        self.images += inputs[0].shape[0]

    def close(self) -> None:
        self.handle.remove()


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.tfc"))


def test_second_extraction_over_the_same_manifest_runs_no_backbone_forward(
    extractor: FeatureExtractor, train_paths: list[Path], tmp_path: Path
) -> None:
    counter = ForwardCounter(extractor)
    try:
        cold_cache = FeatureCache(tmp_path)
        cold = extract_features(extractor, train_paths, batch_size=8, progress=False, cache=cold_cache)
        assert counter.calls == 2 and counter.images == len(train_paths)
        assert cold_cache.stats.misses == len(train_paths) and cold_cache.stats.hits == 0
        assert len(_entries(tmp_path)) == len(train_paths)

        counter.calls = counter.images = 0
        warm_cache = FeatureCache(tmp_path)  # a new run: nothing carried over in memory
        warm = extract_features(extractor, train_paths, batch_size=8, progress=False, cache=warm_cache)
        assert counter.calls == 0 and counter.images == 0
        assert warm_cache.stats.forwards == 0 and warm_cache.stats.misses == 0
        assert warm_cache.stats.hits == len(train_paths)
        assert torch.equal(cold, warm)  # fused from the same float16 maps: bit-identical
    finally:
        counter.close()


def test_truncated_or_corrupted_entry_is_detected_and_recomputed(
    extractor: FeatureExtractor, train_paths: list[Path], tmp_path: Path
) -> None:
    paths = train_paths[:4]
    reference = extract_features(extractor, paths, progress=False, cache=FeatureCache(tmp_path))
    entries = _entries(tmp_path)
    sizes = {p: p.stat().st_size for p in entries}
    truncated, flipped = entries[0], entries[1]
    truncated.write_bytes(truncated.read_bytes()[: sizes[truncated] // 2])  # a kill / full disk mid-copy
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # one corrupted payload byte: same length, wrong checksum
    flipped.write_bytes(bytes(data))

    cache = FeatureCache(tmp_path)
    counter = ForwardCounter(extractor)
    try:
        again = extract_features(extractor, paths, progress=False, cache=cache)
    finally:
        counter.close()
    assert cache.stats.corrupt == 2 and cache.stats.misses == 2 and cache.stats.hits == 2
    assert counter.images == 2  # only the two broken entries were recomputed
    assert torch.equal(again, reference)
    assert {p: p.stat().st_size for p in _entries(tmp_path)} == sizes  # overwritten with complete entries
    check = FeatureCache(tmp_path)
    extract_features(extractor, paths, progress=False, cache=check)
    assert check.stats.hits == 4 and check.stats.corrupt == 0


def test_key_is_content_and_backbone_not_path_or_feature_size(
    extractor: FeatureExtractor, train_paths: list[Path], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    extract_features(extractor, train_paths[:2], progress=False, cache=FeatureCache(cache_dir))

    copy = tmp_path / "renamed.png"
    shutil.copy(train_paths[0], copy)
    smaller = FeatureExtractor(load_config("tiny", ["features.feature_size=8"]).features)
    cache = FeatureCache(cache_dir)
    features = extract_features(smaller, [copy, train_paths[1]], progress=False, cache=cache)
    assert cache.stats.hits == 2 and cache.stats.forwards == 0  # a feature-size ablation reuses entries
    assert features.shape[-1] == 8

    base = load_config("tiny").features
    other_backbone = "efficientnet_lite1" if base.backbone != "efficientnet_lite1" else "efficientnet_lite0"
    overrides = (
        f"features.image_size={base.image_size - 32}",
        f"features.layers={base.layers[:-1]}",
        f"features.backbone={other_backbone}",
    )
    for override in overrides:
        other = FeatureExtractor(load_config("tiny", [override]).features)
        cache = FeatureCache(cache_dir)
        extract_features(other, train_paths[:1], progress=False, cache=cache)
        assert cache.stats.misses == 1, override


def test_unloaded_backbone_is_never_cached(tiny_config: Config) -> None:
    with pytest.raises(ValueError, match="load_weights=False"):
        cache_namespace(FeatureExtractor(tiny_config.features, load_weights=False))


def test_float16_error_on_features_and_scores(
    fabric_bundle: Path, synth_root: Path, extractor: FeatureExtractor, tmp_path: Path
) -> None:
    """The error the float16 store introduces, bounded by float16's 2⁻¹¹ relative rounding."""
    paths = sorted((synth_root / "fabric" / "test").glob("*/*.png"))[::4]
    exact = extract_features(extractor, paths, progress=False)
    cached = extract_features(extractor, paths, progress=False, cache=FeatureCache(tmp_path))
    error = (cached - exact).abs()
    scale = exact.abs().amax(dim=(0, 2, 3), keepdim=True)  # per channel: bilinear mixes neighbours
    assert float((error / scale).max()) <= 2**-11
    big = exact.abs() > 1e-2
    assert float((error[big] / exact.abs()[big]).mean()) < 2**-12  # rounding averages to half the bound
    assert not torch.equal(cached, exact)  # the cache does store a lossy copy

    predictor = Predictor.from_bundle(fabric_bundle, device="cpu")
    scores_exact, _ = predictor.score_features(exact)
    scores_cached, _ = predictor.score_features(cached)
    relative = ((scores_cached - scores_exact).abs() / scores_exact.abs()).max()
    assert float(relative) < 1e-3


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from tfanet_core.cache import FeatureCache
    cache = FeatureCache(sys.argv[1])
    print("ready", flush=True)
    while True:
        for i in range(6):
            g = torch.Generator().manual_seed(i)
            maps = [torch.randn(64, 128, 128, generator=g).half(), torch.randn(128, 64, 64, generator=g).half()]
            cache.put(f"{i:02d}" * 32, {"backbone": "toy", "layers": [1, 2], "image_size": 0}, f"img{i}", maps)
    """
)


def _expected(i: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return [torch.randn(64, 128, 128, generator=g).half(), torch.randn(128, 64, 64, generator=g).half()]


def test_concurrent_writers_killed_mid_write_never_expose_a_partial_entry(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        for _ in range(2)
    ]
    reader = FeatureCache(tmp_path)
    reads = 0
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for i in range(6):
                maps = reader.get(f"{i:02d}" * 32)
                if maps is not None:  # absent is fine; present must be complete and right
                    reads += 1
                    assert all(torch.equal(a, b) for a, b in zip(maps, _expected(i), strict=True))
    finally:
        for w in writers:
            os.killpg(w.pid, signal.SIGKILL)  # kill -9 while they write
            w.wait(timeout=30)
            if w.stdout is not None:
                w.stdout.close()
    assert reads > 0 and reader.stats.corrupt == 0

    after = FeatureCache(tmp_path)
    report = after.report(verify=True)
    assert report["corrupt"] == 0 and report["entries"] == 6
    for i in range(6):
        maps = after.get(f"{i:02d}" * 32)
        assert maps is not None and all(torch.equal(a, b) for a, b in zip(maps, _expected(i), strict=True))
    # A killed writer's temp file is never read as an entry; prune removes it once it is stale.
    temps = list(tmp_path.glob("*/*/*.tmp"))
    for t in temps:
        os.utime(t, (time.time() - 7200, time.time() - 7200))
    assert after.prune()["stale_temp_files_removed"] == len(temps)
    assert not list(tmp_path.glob("*/*/*.tmp"))


def _fill(cache: FeatureCache, n: int) -> list[str]:
    keys = [f"{i:02x}" * 32 for i in range(n)]
    for age, key in enumerate(keys):
        cache.put(key, {"backbone": "toy", "layers": [1], "image_size": 32}, key, [torch.zeros(4, 8, 8).half()])
        os.utime(cache.path_for(key), (1_000_000 + age, 1_000_000 + age))  # key 0 least recently used
    return keys


def test_report_and_prune(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    keys = _fill(cache, 5)
    report = cache.report()
    size = cache.path_for(keys[0]).stat().st_size
    assert report["entries"] == 5 and report["bytes"] == 5 * size and report["corrupt"] == 0
    (group,) = report["groups"].values()
    assert group["entries"] == 5 and group["namespace"]["backbone"] == "toy"

    assert cache.prune(max_bytes=3 * size, dry_run=True)["removed"] == 2
    assert len(_entries(tmp_path)) == 5
    cache.get(keys[0])  # a hit marks it recently used: now keys[1], keys[2] are the oldest
    result = cache.prune(max_bytes=3 * size)
    assert result["removed"] == 2 and result["kept_bytes"] == 3 * size
    assert not cache.path_for(keys[1]).exists() and not cache.path_for(keys[2]).exists()
    assert cache.path_for(keys[0]).exists()
    assert cache.prune(older_than_days=1)["removed"] == 2  # keys 3 and 4, last used in 1970


def test_prune_by_age_and_everything(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    keys = _fill(cache, 3)
    os.utime(cache.path_for(keys[2]))  # used just now
    assert cache.prune(older_than_days=1)["removed"] == 2
    assert [p.stem for p in _entries(tmp_path)] == [keys[2]]
    assert cache.prune(everything=True)["removed"] == 1
    assert cache.report()["entries"] == 0


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TFANET_CACHE_DIR", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "tfanet" / "features"
    monkeypatch.setenv("TFANET_CACHE_DIR", str(tmp_path))
    assert resolve_cache_dir(None) == tmp_path
    assert resolve_cache_dir("off") is None
    monkeypatch.setenv("TFANET_CACHE_DIR", "off")
    assert default_cache_dir() is None
    assert parse_size("2G") == 2 << 30 and parse_size("500MiB") == 500 << 20 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="500M"):
        parse_size("lots")


def test_entry_key_depends_on_every_namespace_field() -> None:
    base = {"backbone": "a", "layers": [1, 2], "image_size": 256}
    keys = {entry_key(base, "x"), entry_key({**base, "layers": [1]}, "x"), entry_key(base, "y")}
    assert len(keys) == 3


def test_cli_cache_report_and_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fill(FeatureCache(tmp_path), 4)
    assert main(["cache", "report", "--cache-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["entries"] == 4
    assert main(["cache", "report", "--cache-dir", str(tmp_path)]) == 0
    assert "4 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-size", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 4
    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 2  # nothing said what to prune
    assert "--max-size" in capsys.readouterr().err


def test_train_category_reads_through_the_cache(synth_root: Path, tmp_path: Path) -> None:
    from tfanet_core.workflow import train_category

    config = load_config("tiny", ["train.epochs=1"])
    cache_dir = tmp_path / "cache"
    first = train_category(synth_root, "fabric", config, tmp_path / "a", progress=False, cache_dir=cache_dir)
    n_images = first.dataset["n_train"] + first.dataset["n_val"]
    assert len(_entries(cache_dir)) == n_images
    second = train_category(synth_root, "fabric", config, tmp_path / "b", progress=False, cache_dir=cache_dir)
    assert len(_entries(cache_dir)) == n_images
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same features from the cache → same training
