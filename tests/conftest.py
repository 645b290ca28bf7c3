"""Test setup: quiet, offline, and one session-scoped local Ray cluster for the tests that need it
(pure cores are tested without Ray)."""

from __future__ import annotations

import os

for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(key, value)
os.environ.pop("RAY_ADDRESS", None)  # tests never attach to a cluster running on this machine

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=False)
    yield ray
    ray.shutdown()
