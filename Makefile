# The two commands a new user needs: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lint demo stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev,mlops]"
	@touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not server"

DEMO := runs/demo
demo: venv
	$(BIN)/tfanet synth --out $(DEMO)/data
	$(BIN)/tfanet train --data $(DEMO)/data --category fabric --profile tiny --out $(DEMO)/bundles/fabric
	$(BIN)/tfanet evaluate --bundle $(DEMO)/bundles/fabric --data $(DEMO)/data --category fabric --out $(DEMO)/eval/fabric
	$(BIN)/tfanet predict --bundle $(DEMO)/bundles/fabric $(DEMO)/data/fabric/test/good/000.png $(DEMO)/data/fabric/test/hole/000.png
	@echo "Evaluation report: $(DEMO)/eval/fabric (metrics.json, curves, overlays)."
	@echo "The MLOps chain (DVC, MLflow, TorchServe) is not yet available in the demo: it arrives with its issues."

stop:
	@echo "nothing to stop: the local stack arrives with the MLOps chain"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
