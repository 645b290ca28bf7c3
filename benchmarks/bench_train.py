"""Benchmark: Ray Train steady-state tokens/s vs a plain PyTorch loop with the same model, global
batch and threads (start-up reported apart).

    .venv/bin/python benchmarks/bench_train.py [--steps 40] [--warmup 10] [--rounds 3] [key=value ...]

Data: the demo prepare output (made first if missing). Model: the demo's small GPT-2, seq_len 256.
Ray: 2 workers x 1 thread x batch 8 (`jobs/configs/pretrain_demo.yaml`). Baseline: one process,
2 threads, batch 16, the same `Trainer.train_step` (in general: workers x threads per worker
threads, workers x batch rows, so ``scaling.num_workers=1 train.batch_size=16`` compares one
worker with one thread, leaving a core to Ray's control processes). Steady state: steps after ``--warmup``.
Each round measures both sides back to back (a Ray fit, Ray shut down, the plain loop), Ray first in
odd rounds and the plain loop first in even ones (ABBA), so that machine noise, and a machine that
speeds up or slows down over minutes, hit both sides alike; the ratio reported is the median of the
per-round ratios. Extra ``key=value`` arguments override
the pretrain config (e.g. ``train.shuffle_buffer=0``).

``--cpu-report S`` (Linux) also samples, during the first round's steady state, where the machine's
CPU goes for S seconds (``benchmarks.common.cpu_breakdown``): the workers' on-CPU and run-queue-wait
shares and every other process's share. Give the round enough steps (``--steps 90 --cpu-report 20``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cpu_breakdown, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-report", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from jobs.prepare import parse_config as parse_prepare
    from jobs.pretrain import parse_config as parse_pretrain
    from pipeline.data.prepare import run_prepare
    from pipeline.model.build import build_model
    from pipeline.ray_utils import init_ray
    from pipeline.train.loop import Trainer
    from pipeline.train.pretrain import run_pretrain

    import ray

    init_ray(num_cpus=2)
    manifest = run_prepare(parse_prepare(["--config", "jobs/configs/prepare_demo.yaml"]))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(manifest["tokenizer"])
    rows = pq.read_table(str(Path(manifest["output_dir"]) / manifest["shards"][0]["path"])).column("input_ids").to_pylist()
    data = torch.tensor(rows, dtype=torch.long)
    ray_tps, plain_tps, walls = [], [], []

    def ray_side(rnd: int):
        if not ray.is_initialized():
            init_ray(num_cpus=2)
        cfg = parse_pretrain(["--config", "jobs/configs/pretrain_demo.yaml", f"output_dir={tempfile.mkdtemp(prefix='bench_train')}",
                              f"train.max_steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps}",
                              "train.eval_batches=1", "train.early_stopping_patience=null", *args.overrides])
        report: dict = {}
        if args.cpu_report and rnd == 0:
            def sample() -> None:
                try:
                    report.update(cpu_breakdown(args.cpu_report))
                except Exception as exc:  # reported, never fails the benchmark
                    report["error"] = repr(exc)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        t0 = time.perf_counter()
        summary = run_pretrain(cfg)
        walls.append(time.perf_counter() - t0)
        records = [json.loads(l) for l in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        ray_tps.append(statistics.median(r["tokens_per_s"] for r in records
                                         if r["kind"] == "train" and r["step"] > args.warmup))
        if args.cpu_report and rnd == 0:
            print_cpu_report(report)
        # the plain loop runs with Ray shut down (its daemons idle on the same cores otherwise,
        # which would slow the baseline)
        ray.shutdown()

    def plain_side(cfg) -> int:
        """Plain PyTorch: same model, global batch (16 x 256 in the demo) and threads (workers x
        threads per worker). Returns the global batch."""
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.scaling.num_workers * cfg.scaling.threads_per_worker)
        model = build_model(cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
        trainer = Trainer(model, cfg.optim, cfg.train, torch.device("cpu"))
        gb = cfg.train.batch_size * cfg.scaling.num_workers
        times = []
        for step in range(args.steps):
            x = data[(step * gb) % (len(data) - gb):][:gb]
            t = time.perf_counter()
            trainer.train_step([{"input_ids": x, "labels": x}], step)
            times.append(time.perf_counter() - t)
        torch.set_num_threads(threads)
        plain_tps.append(gb * x.shape[1] / statistics.median(times[args.warmup:]))
        return gb

    cfg = parse_pretrain(["--config", "jobs/configs/pretrain_demo.yaml", *args.overrides])
    plain_threads = cfg.scaling.num_workers * cfg.scaling.threads_per_worker
    for rnd in range(args.rounds):
        # ABBA: Ray first in even rounds, the plain loop first in odd ones, so that a machine
        # speeding up or slowing down over a round favours each side equally often
        if rnd % 2 == 0:
            ray_side(rnd)
            gb = plain_side(cfg)
        else:
            gb = plain_side(cfg)
            ray_side(rnd)
        print(f"round {rnd + 1} ({'Ray' if rnd % 2 == 0 else 'plain'} first): ray {ray_tps[-1]:,.0f} tokens/s, "
              f"plain {plain_tps[-1]:,.0f} tokens/s, ratio {ray_tps[-1] / plain_tps[-1]:.3f}", flush=True)
    ratios = [r / p for r, p in zip(ray_tps, plain_tps)]
    print(f"machine: {machine()}; model {cfg.model.preset} {cfg.model.arch}, global batch {gb} x {data.shape[1]} tokens; "
          f"{args.rounds} rounds; overrides {args.overrides}")
    print(f"plain PyTorch (1 process x {plain_threads} thread(s)): median {statistics.median(plain_tps):,.0f} tokens/s")
    print(f"Ray Train ({cfg.scaling.num_workers} worker(s) x {cfg.scaling.threads_per_worker} thread(s)): median {statistics.median(ray_tps):,.0f} tokens/s; whole fit() "
          f"incl. start-up median {statistics.median(walls):.1f} s for {args.steps} steps")
    print(f"ratio Ray / plain: median {statistics.median(ratios):.2f}x (per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; goal >= 0.95x)")

def print_cpu_report(report: dict) -> None:
    if "machine_pct_of_one_core" not in report:
        print(f"cpu report: {report.get('error') or 'the fit ended before the sampling window closed (raise --steps)'}")
        return
    split = report["machine_pct_of_one_core"]
    workers = {w["pid"] for w in report["workers"]}
    in_workers = sum(c for c, pid, _ in report["processes"] if pid in workers)
    used = sum(v for k, v in split.items() if k != "idle")
    print(f"cpu report ({report['seconds']} s, % of one core): machine {split}; used {used:.1f}, "
          f"training workers {in_workers:.1f}, everything else {used - in_workers:.1f}")
    for w in report["workers"]:
        print(f"  worker pid {w['pid']}: training thread on CPU {w['on_cpu_pct']}%, runnable but waiting "
              f"for a core {w['runqueue_wait_pct']}%")
    for c, pid, name in report["processes"][:16]:
        if pid not in workers and c >= 0.3:
            print(f"  {c:5.1f}  {name}")


if __name__ == "__main__":
    main()
