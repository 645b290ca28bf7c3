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


@pytest.fixture(scope="session")
def tiny_prepared(ray_session, tmp_path_factory):
    """A finished prepare output of ~200 synthetic documents (seq_len 32, vocab 300)."""
    import random

    from pipeline.config import from_dict
    from pipeline.data.prepare import PrepareConfig, run_prepare
    from tests.helpers import document, write_jsonl

    rng = random.Random(11)
    root = tmp_path_factory.mktemp("tiny_corpus")
    write_jsonl(root / "docs.jsonl", [document(rng, 2) for _ in range(200)])
    cfg = from_dict(PrepareConfig, {
        "name": "tiny", "output_dir": str(tmp_path_factory.mktemp("tiny_prepared")), "sources": [str(root / "docs.jsonl")],
        "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32, "docs_per_shard": 50},
        "split": {"val_fraction": 0.1},
    })
    manifest = run_prepare(cfg)
    return cfg.run_dir, manifest
