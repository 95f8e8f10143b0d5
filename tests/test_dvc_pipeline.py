"""dvc.yaml with real DVC and the real flow (flows/train.py), in a throwaway git repository.

The repository's dvc.yaml, params.yaml, .gitignore, flows/ and src/gaussad are copied in;
params are shrunk (one category, 64 px, two levels) and the demo stage writes a small dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gaussad.demo import write_demo_dataset

REPO = Path(__file__).resolve().parents[1]
# The demo stage with small counts (`gaussad demo-data` writes the full-size dataset: ~30 s).
SMALL_DEMO = (
    'python -c "from gaussad.demo import write_demo_dataset as w; w(\'data/demo\', seed=${demo.seed}, '
    "categories=['weave'], n_train=12, n_test_good=4, n_test_per_defect=2, image_size=64)\""
)


def run(repo: Path, *args: str, env: dict) -> str:
    """Run a command in the repo; fail with its output if it fails; return stdout + stderr."""
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def registered_versions(env: dict) -> int:
    from mlflow.tracking import MlflowClient

    return len(MlflowClient(env["MLFLOW_TRACKING_URI"]).search_model_versions("name = 'gaussad-demo-weave'"))


@pytest.fixture
def env(tmp_path):
    bin_dir = str(Path(sys.executable).parent)  # the venv's gaussad, python and dvc come first
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # the train stage tracks and registers
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


@pytest.fixture
def project(tmp_path, env):
    """A fresh git + DVC repository holding this repository's pipeline, with small settings."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for folder in ("flows", "src/gaussad"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run(repo, "git", "init", "-q", env=env)
    run(repo, "dvc", "init", "-q", env=env)
    run(repo, "dvc", "config", "cache.type", "hardlink,symlink", env=env)

    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert pipeline["stages"]["demo_data"]["cmd"].startswith("gaussad demo-data data/demo")
    pipeline["stages"]["demo_data"]["cmd"] = SMALL_DEMO
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(root="data/demo", categories=["weave"])
    params["model"].update(image_size=64, levels=[3, 4], batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def test_dvc_add_push_pull_restores_data(project, env, tmp_path):
    data = project / "data" / "mvtec"
    write_demo_dataset(data, categories=["brushed"], n_train=4, n_test_good=2, n_test_per_defect=1, image_size=32)
    before = digests(data)
    run(project, "dvc", "add", "data/mvtec", env=env)
    assert (project / "data" / "mvtec.dvc").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/mvtec.dvc"], cwd=project)
    assert ignored.returncode == 1, "data/mvtec.dvc must be committable (not git-ignored)"
    run(project, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), env=env)
    run(project, "dvc", "push", env=env)

    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(data)
    run(project, "dvc", "pull", "data/mvtec.dvc", env=env)
    assert digests(data) == before

    # data.root is the switch: train now depends on the added dataset, not on the demo stage
    assert '"demo_data" -> "train"' in run(project, "dvc", "dag", "--dot", env=env)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["root"] = "data/mvtec"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dag = run(project, "dvc", "dag", "--dot", env=env)
    assert '"data/mvtec.dvc" -> "train"' in dag and '"demo_data" -> "train"' not in dag


@pytest.mark.slow  # two flow runs, ~35 s each (mostly Prefect's temporary server)
def test_repro_reruns_only_what_changed(project, env):
    first = run(project, "dvc", "repro", env=env)
    assert "Running stage 'demo_data'" in first and "Running stage 'train'" in first
    out = project / "outputs" / "pipeline"
    for name in ("metrics.json", "run.json", "plots/roc_weave.csv", "weave/model/config.json",
                 "weave/model/stats.safetensors", "weave/evaluation/metrics.json"):
        assert (out / name).is_file(), name
    run(project, "git", "add", "-A", env=env)
    run(project, "git", "commit", "-q", "-m", "first run", env=env)
    assert registered_versions(env) == 1

    again = run(project, "dvc", "repro", env=env)
    assert "Running stage" not in again
    assert "Stage 'train' didn't change" in again and "Data and pipelines are up to date" in again
    assert registered_versions(env) == 1  # a skipped stage registers nothing

    shown = run(project, "dvc", "metrics", "show", env=env)
    assert "weave" in shown and "image_auroc" in shown
    assert any(word.replace(".", "", 1).isdigit() for word in shown.split())
    run(project, "dvc", "plots", "show", env=env)
    assert (project / "dvc_plots" / "index.html").is_file()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["variance"] = 0.1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(project, "dvc", "repro", env=env)
    assert "Stage 'demo_data' didn't change" in changed and "Running stage 'train'" in changed
    assert "Running stage 'demo_data'" not in changed
    assert (out / "weave" / "model" / "config.json").is_file()
    assert registered_versions(env) == 2  # the refitted model is the new challenger

    # HEAD's metrics come from the cache (outputs/ is git-ignored): both columns are filled
    diff = run(project, "dvc", "metrics", "diff", "--all", "--md", env=env)
    row = next(line for line in diff.splitlines() if "categories.weave.aupro" in line)
    head, workspace = (cell.strip() for cell in row.split("|")[3:5])
    assert float(head) >= 0 and float(workspace) >= 0, diff
    assert "0.1" in run(project, "dvc", "params", "diff", env=env)
