"""`gaussad prune` against a real `mlflow server`: old versions and their logged models go, the newest
and the aliased ones stay."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from servers import tracking_to
from test_registry import CATEGORY, SMALL, pipeline_folder

import mlflow
from gaussad.cli import main
from gaussad.demo import write_demo_dataset
from gaussad.gaussian import GaussianAD
from gaussad.registry import CHAMPION
from gaussad.retention import logged_model_id, prune
from gaussad.tracking import ensure_experiment, log_run_folder

NAME = f"gaussad-retain-{CATEGORY}"  # the dataset folder is named "retain"


class Echo(mlflow.pyfunc.PythonModel):  # the smallest pyfunc model: what it scores does not matter here
    def predict(self, context, model_input):
        return model_input


def test_prune_keeps_the_newest_and_the_aliased_versions_and_deletes_the_rest(mlflow_server, tmp_path, capsys):
    data = tmp_path / "retain"
    write_demo_dataset(data, seed=8, categories=[CATEGORY], n_train=6, n_test_good=2, n_test_per_defect=1,
                       image_size=64)
    for seed in range(1, 6):  # five different models: versions 1-5, the last one the challenger
        model = GaussianAD(weights="none", seed=seed, **SMALL)
        log_run_folder(pipeline_folder(tmp_path / f"run{seed}", data, model), experiment="retain", uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(NAME, CHAMPION, "2")
    model_ids = {v.version: logged_model_id(v) for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(model_ids) == ["1", "2", "3", "4", "5"] and all(model_ids.values())

    with tracking_to(mlflow_server):
        assert main(["prune", NAME, "--keep", "2", "--dry-run"]) == 0
        assert f"{NAME}: would delete versions 1, 3; kept 2 (champion), 4 (newest), 5 (newest, challenger)" in \
            capsys.readouterr().out
        assert len(client.search_model_versions(f"name = '{NAME}'")) == 5  # a dry run deletes nothing

        assert main(["prune", NAME, "--keep", "2"]) == 0
    assert f"{NAME}: deleted versions 1, 3;" in capsys.readouterr().out
    assert sorted(v.version for v in client.search_model_versions(f"name = '{NAME}'")) == ["2", "4", "5"]
    for version, model_id in model_ids.items():  # the deleted versions' logged models are deleted too
        if version in ("1", "3"):
            with pytest.raises(MlflowException):
                client.get_logged_model(model_id)
        else:
            assert client.get_logged_model(model_id).model_id == model_id
    with pytest.raises(ValueError, match="no registered model 'gaussad-retain-nothing'"):
        prune("gaussad-retain-nothing", 1, uri=mlflow_server)


def test_prune_on_a_local_sqlite_store(tmp_path):
    """A local store gives versions as ints (a server gives strings): the same answer."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow's own switch, which restores the process's tracking URI as it was (an earlier test may
    # have set one with mlflow.set_tracking_uri, which then wins over MLFLOW_TRACKING_URI)
    with _use_tracking_uri(uri):
        experiment = ensure_experiment("retain-local", uri)  # its artifacts beside the database
        for _ in range(2):
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.pyfunc.log_model(name="pyfunc", python_model=Echo())
            mlflow.register_model(info.model_uri, "gaussad-local-x")
    pruned = prune("gaussad-local-x", 1, uri=uri)
    assert (pruned.deleted, pruned.kept) == (["1"], {"2": ["newest"]})
    assert [str(v.version) for v in MlflowClient(uri).search_model_versions("name = 'gaussad-local-x'")] == ["2"]
