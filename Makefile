# Two entry points: `make demo` and `make test`. Both create .venv and install gaussad into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

# Demo data -> fit + evaluate every category (offline ImageNet weights) -> results table.
demo: $(STAMP)
	$(BIN)/gaussad demo --data data/demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_gaussian.py

# The MLflow UI on the local store (gaussad log / the flow write to mlflow/ unless MLFLOW_TRACKING_URI is set).
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --port 5000

clean:
	rm -rf outputs data/demo
