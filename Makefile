# Two entry points: `make demo` and `make test`. Both create .venv and install gaussad into it,
# with every extra (pipeline: Prefect and DVC; tracking: MLflow; test: pytest).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench ui clean screenshots

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[all,test]"
	touch $(STAMP)

# Demo data -> fit + evaluate every category (offline ImageNet weights) -> results table.
# data/ is the dataset root tracked by data.dvc; when it is missing or empty, the demo writes the
# demo data there (the content data.dvc pins); a dataset already in data/ is used as it is.
demo: $(STAMP)
	$(BIN)/gaussad demo --data data --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The pictures of docs/img/ from a real run of the demo through the flows, MLflow and Prefect
# servers (docs/make_screenshots.py; Chromium from the system: apt-get install chromium).
screenshots: $(STAMP)
	$(BIN)/pip install --quiet "playwright>=1.40"
	$(BIN)/python docs/make_screenshots.py
	$(BIN)/python docs/make_demo_picture.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_gaussian.py

# The MLflow UI on the local store (gaussad log / the flow write to mlflow/ unless MLFLOW_TRACKING_URI is set).
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --port 5000

# Results only: data/ is the DVC-tracked dataset (perhaps your MVTec AD copy) and is never deleted
# here; `dvc gc` prunes the DVC cache, `rm -rf mlflow/mlflow.db mlflow/artifacts` the tracking store.
clean:
	rm -rf outputs dvc_plots
