"""How the flows run: Prefect's environment defaults, the device lock, the Dask task runner.

Import this module before `prefect`: Prefect reads its settings from the environment when it is
imported. Prefect's ephemeral server needs 20-26 s to start on a fresh PREFECT_HOME here, past its
20 s default; and its analytics would call out to the internet. Users' own settings win.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# One extraction, training or scoring at a time per process: two categories must not fight over one
# GPU (or oversubscribe the CPU cores). Prefect's thread pool runs the categories' tasks concurrently.
_DEVICE_LOCK = threading.BoundedSemaphore(1)


def device_lock() -> threading.BoundedSemaphore:
    """This process's device lock. Tasks call this rather than name the lock: a task shipped to a
    Dask worker is pickled with the globals it names, and a lock cannot be pickled."""
    return _DEVICE_LOCK


def dask_runner(workers: int | None = None, address: str | None = None):
    """Prefect's Dask task runner: a local cluster of `workers` processes (one thread each, so a
    worker's torch threads have its core), or the cluster at `address`."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
