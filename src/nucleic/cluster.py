"""Scale-out through Dask: where a stage's independent units of work run (README, "Scaling out").

cluster.address: null (default) runs every unit in this process, as a plain run always did, and
imports nothing of Dask. "local" starts a Dask LocalCluster on this machine: one single-threaded
worker process per GPU, else per core (cluster.local_workers overrides). Anything else is a
scheduler's address (tcp://host:8786) or the scheduler file `dask scheduler --scheduler-file` wrote.

Units: folding shards (stages 01, 02) go through joblib's Dask backend; one (model, fold) of
training or test prediction is one Dask task (`map_units`). Workers read and write the same paths
as the driver, so on several nodes `paths.*` must be on a shared file system.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from .engine import setup_device

_client = None  # the open session's dask Client (None: units run in this process)


def current_client():
    return _client


@contextlib.contextmanager
def session(cluster_cfg) -> Iterator[object | None]:
    """Connect to (or start) the cluster named by cluster.address for the duration of one stage run;
    joblib's Parallel then runs on it. Yields the Client, or None for the single-process path."""
    global _client
    address = cluster_cfg["address"]
    if not address or _client is not None:  # single process, or a session already open (nested stages)
        yield _client
        return
    import joblib

    with _connect(address, cluster_cfg) as client, joblib.parallel_config(backend="dask"):
        _client = client
        try:
            yield client
        finally:
            _client = None


@contextlib.contextmanager
def _connect(address: str, cluster_cfg):
    from distributed import Client, LocalCluster

    if address != "local":
        scheduler_file = os.path.isfile(address)
        client = Client(scheduler_file=address) if scheduler_file else Client(address)
        with client:
            yield client
        return
    gpus = torch.cuda.device_count()
    workers = cluster_cfg["local_workers"] or gpus or os.cpu_count() or 1
    # One thread per worker: ViennaRNA keeps global state, and a core per worker is what torch wants.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={"GPU": 1} if gpus else None) as cluster, Client(cluster) as client:
        yield client


def map_units(function: Callable, units: list[tuple], local: dict | None = None) -> list:
    """function(*unit) for every unit, results in order. With no cluster each runs here, given `local`
    as keyword arguments too (what this process already holds, e.g. loaded data); on a cluster each is
    one task (needing a GPU where the workers offer them) and loads what it needs itself."""
    client = current_client()
    if client is None:
        return [function(*unit, **(local or {})) for unit in units]
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    resources = {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None
    futures = [client.submit(function, *unit, pure=False, resources=resources) for unit in units]
    return client.gather(futures)


def unit_device(tc) -> torch.device:
    """What a unit of work that loads its own data sets up first: torch's threads from train.threads, and
    train.device, with `cuda` pinned to this LocalCluster worker's own GPU (workers are named 0..n-1).
    Workers started by hand see one GPU each (CUDA_VISIBLE_DEVICES)."""
    device = setup_device(tc)
    if device.type != "cuda" or device.index is not None:
        return device
    try:
        from distributed import get_worker

        worker_name = get_worker().name
    except (ImportError, ValueError):  # not inside a dask worker
        return device
    if isinstance(worker_name, int):
        return torch.device("cuda", worker_name % torch.cuda.device_count())
    return device
