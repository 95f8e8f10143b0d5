"""data.dvc and dvc.yaml with real DVC and the real flow (gaussad/flows/train.py), in throwaway git repositories.

The repository's dvc.yaml, params.yaml, .gitignore, .dvcignore, data.dvc, flows/ and src/gaussad are
copied in, as a fresh clone would have them (no data/, an empty DVC cache, no remote); data/ is then
written by the demo generator, as `make demo` or `gaussad demo-data data` writes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gaussad.demo import write_demo_dataset

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "data.dvc")
MISMATCH_HINT = (
    "the demo data written here differs from what data.dvc pins. Either the generator changed "
    "(then regenerate, `dvc add data` and commit data.dvc) or this machine renders other bytes: "
    "Pillow's zlib build, or numpy or scipy maths that differ past float64's last bits"
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

    # the registered name is gaussad-<data.name>-<category>
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


def fresh_clone(repo: Path, env: dict, code: bool = True) -> Path:
    """A git + DVC repository holding this repository's pipeline files (and code), committed."""
    repo.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, repo / name)
    if code:
        shutil.copytree(REPO / "src/gaussad", repo / "src/gaussad", ignore=shutil.ignore_patterns("__pycache__"))
    run(repo, "git", "init", "-q", env=env)
    run(repo, "dvc", "init", "-q", env=env)
    run(repo, "dvc", "config", "cache.type", "hardlink,symlink", env=env)
    run(repo, "git", "add", "-A", env=env)
    run(repo, "git", "commit", "-q", "-m", "clone", env=env)
    return repo


@pytest.fixture
def project(tmp_path, env):
    """A fresh clone with small settings (one category, 64 px, two levels) and data/ not yet written."""
    repo = fresh_clone(tmp_path / "repo", env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["root"] == "data"
    params["data"].update(categories=["weave"])
    params["model"].update(image_size=64, levels=[3, 4], batch_size=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "commit", "-q", "-am", "small settings", env=env)
    return repo


def test_demo_data_is_what_data_dvc_pins(tmp_path, env):
    """`gaussad demo-data data` in a fresh clone writes exactly the content data.dvc records."""
    repo = fresh_clone(tmp_path / "repo", env, code=False)
    pointer = (repo / "data.dvc").read_text()
    assert yaml.safe_load(pointer)["outs"][0]["path"] == "data"
    assert subprocess.run(["git", "check-ignore", "-q", "data"], cwd=repo).returncode == 0, "data/ must be git-ignored"
    assert subprocess.run(["git", "check-ignore", "-q", "data.dvc"], cwd=repo).returncode == 1, "data.dvc is committed"

    run(repo, "gaussad", "demo-data", "data", env=env)
    # the data is not in this clone's (empty) cache: DVC says so whether or not it matches data.dvc
    assert "not in cache:       data" in run(repo, "dvc", "status", "data.dvc", env=env)
    # `dvc commit` (no --force) caches the data only when it is what data.dvc records
    done = subprocess.run(["dvc", "commit", "data.dvc"], cwd=repo, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{MISMATCH_HINT}:\n{done.stdout}{done.stderr}"
    assert (repo / "data.dvc").read_text() == pointer
    assert run(repo, "dvc", "status", "data.dvc", env=env).strip() == "Data and pipelines are up to date."


def test_replacing_the_data_then_dvc_add_push_pull(project, env, tmp_path):
    """The loop docs/dvc.md shows for one's own dataset: copy it into data/, dvc add, commit, push; pull."""
    data = project / "data"
    write_demo_dataset(data, categories=["brushed"], n_train=4, n_test_good=2, n_test_per_defect=1, image_size=32)
    before = digests(data)
    gitignore = (project / ".gitignore").read_text()
    run(project, "dvc", "add", "data", env=env)
    assert (project / ".gitignore").read_text() == gitignore, "dvc add data must find /data already ignored"
    assert "data.dvc" in run(project, "git", "status", "--porcelain", env=env)  # a new pointer to commit
    run(project, "git", "add", "data.dvc", env=env)
    run(project, "git", "commit", "-q", "-m", "my dataset", env=env)
    run(project, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), env=env)
    run(project, "dvc", "push", env=env)

    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(data)
    run(project, "dvc", "pull", "data.dvc", env=env)
    assert digests(data) == before
    assert run(project, "dvc", "status", "data.dvc", env=env).strip() == "Data and pipelines are up to date."
    # the train stage depends on data.root, i.e. on the dataset data.dvc tracks
    assert '"data.dvc" -> "train"' in run(project, "dvc", "dag", "--dot", env=env)


def test_repro_stops_in_seconds_on_a_bad_setting(project, env):
    """A bad value in params.yaml stops `dvc repro` with one line naming the key, before the flow
    (and its server) starts and before any image is read."""
    write_demo_dataset(project / "data", categories=["weave"], n_train=4, n_test_good=2, n_test_per_defect=1,
                       image_size=32)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["spatial"] = "foo"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.monotonic()
    done = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("gaussad-train:")]
    assert errors == ["gaussad-train: params.yaml: model.spatial: unknown spatial mode 'foo': "
                      "use one of shared, per-location, stacked"]
    assert not (project / ".gaussad-cache").exists() and not (project / "outputs").exists()
    assert seconds < 60, seconds


@pytest.mark.slow  # two flow runs, ~35 s each (mostly Prefect's temporary server)
def test_repro_reruns_only_what_changed(project, env):
    write_demo_dataset(project / "data")  # the demo data data.dvc pins (what `gaussad demo-data data` writes)
    pointer = (project / "data.dvc").read_text()
    first = run(project, "dvc", "repro", env=env)
    assert "Verifying data sources in stage: 'data.dvc'" in first and "Running stage 'train'" in first
    # repro caches the data; with other bytes it would silently rewrite data.dvc, so check it did not
    assert (project / "data.dvc").read_text() == pointer, MISMATCH_HINT
    out = project / "outputs" / "pipeline"
    for name in ("metrics.json", "run.json", "plots/roc_weave.csv", "weave/model/config.json",
                 "weave/model/stats.safetensors", "weave/evaluation/metrics.json"):
        assert (out / name).is_file(), name
    run(project, "git", "add", "-A", env=env)
    run(project, "git", "commit", "-q", "-m", "first run", env=env)
    assert registered_versions(env) == 1

    again = run(project, "dvc", "repro", env=env)
    assert "Running stage" not in again
    assert "'data.dvc' didn't change" in again and "Stage 'train' didn't change" in again
    assert "Data and pipelines are up to date" in again
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
    assert "'data.dvc' didn't change" in changed and "Running stage 'train'" in changed
    assert (out / "weave" / "model" / "config.json").is_file()
    assert registered_versions(env) == 2  # the refitted model is the new challenger

    # HEAD's metrics come from the cache (outputs/ is git-ignored): both columns are filled
    diff = run(project, "dvc", "metrics", "diff", "--all", "--md", env=env)
    row = next(line for line in diff.splitlines() if "categories.weave.aupro" in line)
    head, workspace = (cell.strip() for cell in row.split("|")[3:5])
    assert float(head) >= 0 and float(workspace) >= 0, diff
    assert "0.1" in run(project, "dvc", "params", "diff", env=env)
