"""Parquet reads with Ray 2.60's footer-reader pool (32 actors per read, whatever the number of
files) vs ours (``pipeline.ray_utils.read_parquet``: one actor per 10 files, up to 32). The
workload is a whole prepare run on a small synthetic corpus (every step reads Parquet), each
run in a fresh process with its own local Ray cluster; seconds from start to manifest.

    .venv/bin/python benchmarks/bench_footer_pool.py [--docs 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine  # noqa: E402

CHILD = """
import json, random, sys, tempfile, time
from pathlib import Path
import ray
from pipeline.config import from_dict
from pipeline.data.prepare import PrepareConfig, run_prepare
from tests.helpers import document, write_jsonl
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
root = Path(tempfile.mkdtemp())
write_jsonl(root / "docs.jsonl", [document(random.Random(11), 2) for _ in range(int(sys.argv[1]))])
cfg = from_dict(PrepareConfig, {"name": "bench", "output_dir": tempfile.mkdtemp(), "sources": [str(root / "docs.jsonl")],
                                "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32, "docs_per_shard": 50}})
start = time.perf_counter()
manifest = run_prepare(cfg)
print(json.dumps({"seconds": time.perf_counter() - start, "shards": len(manifest["shards"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    modes = {"ray default (32 actors)": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"}, "sized to the files": {}}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory():
        for _ in range(args.repeats):
            for mode, extra in modes.items():  # alternate, so that machine noise hits both
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.docs)], cwd=ROOT, env={**env, **extra},
                                     check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1])["seconds"])
    print(f"{machine()}; prepare of {args.docs} documents; medians of {args.repeats} runs (fresh processes)")
    for mode, secs in runs.items():
        print(f"  {mode:>24}: {statistics.median(secs):6.1f} s  ({', '.join(f'{s:.1f}' for s in secs)})")
    base, ours = (statistics.median(runs[m]) for m in modes)
    print(f"  ratio (ray default / ours): {base / ours:.2f}x")


if __name__ == "__main__":
    main()
