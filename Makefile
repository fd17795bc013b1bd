# The two commands a new user needs: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-shuffled test-fast lint demo stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev,mlops]"
	@touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy tfanet_core components

# CI's order is the files' order (reproducible); `make test-shuffled` runs the same suite in a random order
# (pytest-randomly; it prints the seed, `pytest --randomly-seed=N` replays one) to prove no test needs another.
test: venv lint
	$(BIN)/python -m pytest -q -p no:randomly

test-shuffled: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -p no:randomly -m "not slow and not server"

# The whole local chain (infra/local/demo.py): stack + TorchServe on 127.0.0.1, synthetic data under DVC, `dvc repro`
# through deploy, one good and one defective image sent to the endpoint, MLflow UI.
demo: venv
	$(BIN)/python -m infra.local.demo

stop:
	@if test -x $(BIN)/python; then \
		$(BIN)/python -m infra.local.torchserve stop; $(BIN)/python -m infra.local.stack stop; \
	else echo "no .venv: nothing was started"; fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
