"""Connecting to Ray: the running cluster when ``RAY_ADDRESS`` is set (that is how ``ray job submit``
runs a job), otherwise a fresh local one. Nothing here runs at import time."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Initialise Ray if needed; return True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
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


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
