"""Connecting to Ray: the running cluster when ``RAY_ADDRESS`` is set (that is how ``ray job submit``
runs a job), otherwise a fresh local one. Nothing here runs at import time."""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Initialise Ray if needed; return True when this call started it (so the caller shuts it down)."""
    import ray

    global _LOCAL
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    _LOCAL = not address
    if address:
        logger.info("connecting to the Ray cluster at RAY_ADDRESS=%s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("RAY_ADDRESS is not set: starting a local Ray cluster")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            # the dashboard (http://127.0.0.1:8265) shows jobs, logs and metrics; Ray Train's placement
            # group cleaner also relies on its state API. PIPELINE_RAY_DASHBOARD=0 turns it off.
            include_dashboard=os.environ.get("PIPELINE_RAY_DASHBOARD", "1") != "0",
        )
    return True


def check_resources(needed: dict[str, float], what: str, settle_s: float = 3.0, warn_held: bool = True) -> None:
    """``needed`` (e.g. ``{"CPU": 1.0, "GPU": 2}``) against the cluster's total resources. A local
    cluster this process started cannot grow: a shortfall there is an error (Ray would wait for
    the resources forever). A cluster joined through ``RAY_ADDRESS`` may autoscale: a warning.
    Resources the cluster has but other work holds for more than ``settle_s`` seconds: a warning
    that says so (unless ``warn_held`` is False). Work that is ending gives its resources back
    within that time: the sampling tasks of the Parquet reads a run has just set up, the actors of
    the stage before it."""
    import ray

    have = ray.cluster_resources()
    short = _short(needed, have)
    if short:
        msg = f"{what} needs " + ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
        if _LOCAL:
            raise ValueError(msg + " and this local Ray cluster cannot grow; lower the request or join a larger "
                                   "cluster (RAY_ADDRESS)")
        logger.warning("%s: waiting for the cluster to provide them (an autoscaler may add nodes)", msg)
        return
    if not warn_held:
        return
    # enough in total, but held now: without this line the run would wait in silence (Ray Data's
    # read tasks queue for a CPU that, say, Serve replicas hold, and nothing is logged)
    busy = _short(needed, ray.available_resources())
    deadline = time.monotonic() + settle_s
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = _short(needed, ray.available_resources())
    if busy:
        logger.warning("%s needs %s free to start; free now: %s. Other work on the cluster holds the rest (running "
                       "jobs, Serve replicas, actors or placement groups: `ray status` and the dashboard list them); "
                       "this run waits until they are released", what,
                       ", ".join(f"{v:g} {k}" for k, (v, _) in busy.items()),
                       ", ".join(f"{f:g} {k}" for k, (_, f) in busy.items()))


def _short(needed: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """``{resource: (needed, have)}`` for each resource ``have`` falls short of."""
    return {k: (v, have.get(k, 0)) for k, v in needed.items() if v > have.get(k, 0) + 1e-9}


_LOCAL = False  # whether init_ray started a local cluster in this process


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_BATCH = 10  # files per footer-reading call (Ray's RAY_DATA_PARQUET_FOOTER_BATCH_SIZE default)
_READER = "RAY_DATA_USE_DATASOURCE_V2"
_ENV_LOCK = threading.Lock()


def read_parquet(files: list[str]):
    """``ray.data.read_parquet(files)`` without Ray 2.60's footer-reading actor pool.

    Ray 2.60's default Parquet reader (its "datasource V2") lists the files in a task and reads
    their footers on a pool of actors, 32 per read whatever the number of files
    (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), each one a new worker process started while the
    read waits. Its other reader (V1, ``DataContext.use_datasource_v2 = False``) reads the
    footers in this process, or in plain tasks above a few dozen files, and goes straight to the
    read tasks, which saves seconds per read on a small machine (``benchmarks/bench_footer_pool.py``,
    figures in BENCHMARKS.md). Reads here use V1. A user who chooses a reader
    (``RAY_DATA_USE_DATASOURCE_V2``) or sizes the footer pool gets what they set; V2 with no pool
    size set gets one actor per batch of files, up to Ray's 32. The choice is read when the
    dataset is created (in this process), so setting it around the call is enough."""
    from ray.data import DataContext

    with _ENV_LOCK:
        if _FOOTER_ACTORS in os.environ:
            return _read_settled(files)
        if _READER in os.environ:
            os.environ[_FOOTER_ACTORS] = str(max(1, min(32, -(-len(files) // _FOOTER_BATCH))))
            try:
                return _read_settled(files)
            finally:
                os.environ.pop(_FOOTER_ACTORS, None)
        ctx = DataContext.get_current()
        chosen, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            return _read_settled(files)
        finally:
            ctx.use_datasource_v2 = chosen


def _read_settled(files: list[str], timeout_s: float = 0.5):
    """``ray.data.read_parquet(files)``, returned once the CPUs its set-up tasks took (V1's
    sampling tasks, V2's listing task: one CPU each) are free again, or after ``timeout_s``. The
    tasks have returned when the read does, but the raylet takes up to about 0.1 s to get their
    CPUs back; a Ray Data execution started in that moment warns that the cluster has no free CPU
    and "will hang" (seen in the demo's prepare), and a training run's resource check would see
    them held."""
    import ray

    free = ray.available_resources().get("CPU", 0)
    ds = ray.data.read_parquet(files)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < free - 1e-9 and time.monotonic() < deadline:
        time.sleep(0.01)
    return ds
