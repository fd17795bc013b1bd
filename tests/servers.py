"""Real servers for tests: SeaweedFS S3 + MLflow once per session, TorchServe once per module; free loopback ports.

Registered through ``pytest_plugins`` in conftest.py (not imported into test modules: an
imported session fixture is a separate fixture per module, so the stack would start twice).
Started lazily by the first test that asks for it; always stopped by PID/process group at
the end of the session, also when a test failed or the start itself timed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from components.serving import server  # stdlib-only, like components.stack
from components.stack import LocalStack  # stdlib-only at import time: cheap for every test session


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A running stack in a temporary state dir (MLflow needs 30-50 s on a fresh database)."""
    stack = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        stack.start(timeout=300)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def tracking(local_stack: LocalStack) -> Iterator[str]:
    """MLflow clients of one module talk to the session stack (through the environment, not global state)."""
    assert local_stack.tracking_uri is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", local_stack.tracking_uri)
        yield local_stack.tracking_uri


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The state dir of a TorchServe 0.12 (token auth on, model API on) serving nothing yet, for one module."""
    state = tmp_path_factory.mktemp("torchserve")
    server.start(state, server.free_ports())
    try:
        yield state
    finally:
        server.stop(state)
