"""Shared fixtures: tiny configs, the synthetic dataset, and the location of ../shared/data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tfanet_core.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("TFANET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never write the user's feature cache, and DVC in test projects never phones home."""
    saved = {k: os.environ.get(k) for k in ("TFANET_CACHE_DIR", "DVC_NO_ANALYTICS")}
    os.environ["TFANET_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    os.environ["DVC_NO_ANALYTICS"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> Config:
    """The tiny profile on a short schedule: seconds per test."""
    return load_config("tiny", ["train.epochs=4"])


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tfanet_core.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def synth_probes(synth_root: Path) -> Callable[[str, int], list[Path]]:
    """``(category, count)`` → the probe images register and deploy score: the synthetic product's manifest's."""
    from tfanet_core.data.manifest import Manifest, build_manifest

    manifests: dict[str, Manifest] = {}

    def probes(category: str, count: int) -> list[Path]:
        if category not in manifests:
            manifests[category] = build_manifest(synth_root, category, progress=False)
        return manifests[category].probe_images(count)

    return probes


@pytest.fixture
def real_data() -> Path:
    root = shared_data_root()
    if not (root / "README.md").is_file():
        pytest.skip(f"real data not found at {root} (set TFANET_SHARED_DATA or put ../shared/data beside the repo)")
    return root


@pytest.fixture(scope="session")
def fabric_bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TFA-Net briefly trained on the synthetic fabric product (shared by the slower tests)."""
    from tfanet_core.workflow import train_category

    out = tmp_path_factory.mktemp("bundles") / "fabric"
    config = load_config("tiny", ["train.epochs=12", "calibration.target_fpr=0.25"])
    train_category(synth_root, "fabric", config, out, device="cpu", progress=False)
    return out


# Real-server fixtures (tests/servers.py): registered once, so all modules share one session stack.
pytest_plugins = ["servers"]
