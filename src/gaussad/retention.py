"""Registry retention: delete a registered model's old versions and the models they stored, keeping
the newest ones and every version an alias points to (champion, challenger).

MLflow marks a deleted version's logged model deleted; `mlflow gc` then frees its files (for a
tracking server: run on its backend store, with MLFLOW_TRACKING_URI set to the server).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gaussad.tracking import tracking_uri


@dataclass(frozen=True)
class Pruned:
    name: str
    deleted: list[str]  # versions, oldest first
    kept: dict[str, list[str]]  # version -> why: "newest", and the aliases that point to it


def prune(name: str, keep: int, uri: str | None = None, dry_run: bool = False) -> Pruned:
    """Delete every version of `name` but the `keep` newest and the aliased ones, with their logged
    models (with `dry_run`, only say which)."""
    if keep < 0:
        raise ValueError(f"--keep {keep}: give 0 or more versions to keep beside the aliased ones")
    client = MlflowClient(uri or tracking_uri())
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model {name!r} at {uri or tracking_uri()}") from None
    # versions as strings: MLflow gives ints from a SQLite store, strings over HTTP
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True)
    kept = {str(v.version): ["newest"] for v in versions[:keep]}
    for alias, version in sorted(model.aliases.items()):
        kept.setdefault(str(version), []).append(alias)
    deleted = [v for v in reversed(versions) if str(v.version) not in kept]
    if not dry_run:
        for version in deleted:
            client.delete_model_version(name, str(version.version))
            model_id = logged_model_id(version)
            if model_id:
                client.delete_logged_model(model_id)
    return Pruned(name, [str(v.version) for v in deleted], dict(sorted(kept.items(), key=lambda item: int(item[0]))))


def logged_model_id(version) -> str | None:
    """The id of the logged model a version was registered from: MLflow 3.17 leaves `model_id`
    empty and gives the model in `source` ("models:/m-...")."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None
