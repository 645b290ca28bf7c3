"""Parquet reads with Ray 2.60's default reader and its footer-reader pool (32 actors per read,
whatever the number of files), the same reader with the pool sized to the files (one actor per 10
files, up to 32), and ours (``pipeline.ray_utils.read_parquet``: Ray's V1 reader, no pool). The
workload is a whole prepare run on a small synthetic corpus (every step reads Parquet; seconds
from start to manifest), or a 4-step pretrain of the tiny model on its output (the train and val
splits are read; seconds of ``run_pretrain``), each run in a fresh process with its own local Ray
cluster.

    .venv/bin/python benchmarks/bench_footer_pool.py [--docs 200] [--repeats 3] [--workload pretrain]
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
workload, docs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
root = Path(tempfile.mkdtemp())
write_jsonl(root / "docs.jsonl", [document(random.Random(11), 2) for _ in range(docs)])
cfg = from_dict(PrepareConfig, {"name": "bench", "output_dir": out, "sources": [str(root / "docs.jsonl")],
                                "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32, "docs_per_shard": 50}})
start = time.perf_counter()
manifest = run_prepare(cfg)  # pretrain: the parent prepared ``out`` first, so this returns at once
if workload == "pretrain":
    from pipeline.train.pretrain import PretrainConfig, run_pretrain
    start = time.perf_counter()
    run_pretrain(from_dict(PretrainConfig, {
        "data": str(cfg.run_dir), "output_dir": tempfile.mkdtemp(), "model": {"preset": "tiny", "max_seq_len": 32},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1}}))
print(json.dumps({"seconds": time.perf_counter() - start, "shards": len(manifest["shards"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", choices=["prepare", "pretrain"], default="prepare",
                        help="a whole prepare, or a 4-step pretrain (2 workers) on one prepared output")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "RAY_DATA_USE_DATASOURCE_V2")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    modes = {"ray default (V2, 32 actors)": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"},
             "V2, pool sized to the files": {"RAY_DATA_USE_DATASOURCE_V2": "1"}, "ours (V1, no pool)": {}}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as shared:
        def child(extra: dict, out: str) -> float:
            stdout = subprocess.run([sys.executable, "-c", CHILD, args.workload, str(args.docs), out], cwd=ROOT,
                                    env={**env, **extra}, check=True, capture_output=True, text=True).stdout
            return json.loads(stdout.strip().splitlines()[-1])["seconds"]

        if args.workload == "pretrain":
            child({}, shared)  # one prepared output for every pretrain run
        for _ in range(args.repeats):
            for mode, extra in modes.items():  # alternate, so that machine noise hits every mode
                runs[mode].append(child(extra, shared if args.workload == "pretrain" else tempfile.mkdtemp(dir=shared)))
    what = "prepare" if args.workload == "prepare" else "a 4-step pretrain (2 workers) on the prepare"
    print(f"{machine()}; {what} of {args.docs} documents; medians of {args.repeats} runs (fresh processes)")
    for mode, secs in runs.items():
        print(f"  {mode:>28}: {statistics.median(secs):6.1f} s  ({', '.join(f'{s:.1f}' for s in secs)})")
    base, sized, ours = (statistics.median(runs[m]) for m in modes)
    print(f"  ratios: ray default / ours {base / ours:.2f}x, V2 sized / ours {sized / ours:.2f}x")


if __name__ == "__main__":
    main()
