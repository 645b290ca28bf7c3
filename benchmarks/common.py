"""Helpers shared by the benchmark scripts: the demo corpora as plain texts, timing medians."""

from __future__ import annotations

import os
import platform
import statistics
import time

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}.items():
    os.environ.setdefault(key, value)


def demo_texts() -> list[dict]:
    """The parsed documents of bbc-news + chatterbot (what the prepare stage reads)."""
    from pipeline.data.sources import SourceConfig, expand_source, read_file

    out = []
    for name in ("bbc-news", "chatterbot"):
        for task in expand_source(SourceConfig(path=name)):
            out.extend(r for r in read_file(task, 1_000_000) if r.get("text"))
    return out


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
