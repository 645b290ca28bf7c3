"""Benchmark: serving throughput, latency and time to first token; KV cache vs no cache; int8.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--requests 32] [--max-tokens 32] [--rounds 3]

Model: ``--model``, or ``--preset NAME`` (a freshly built, untrained model of that size, for
speed only), or the demo's pretrained model (``make demo`` first), else an untrained "small"
GPT-2 on the demo tokenizer. All torch work runs on one thread on each side.

1. Serve vs baseline at concurrency 1, 4, 16. Serve: the real application over HTTP (one replica,
   dynamic batching up to 16, KV cache). Baseline: the same model in a plain loop of Hugging Face
   ``generate`` (greedy, its own KV cache), one request at a time (the clients queue on a lock),
   the usual unbatched server. Same prompts, same greedy decoding, same max_tokens.
2. KV cache vs no cache: our engine, batch 1, greedy, 200 new tokens, tokens/s; and the engine's
   GPT-2 fast path vs the ``transformers`` forward it replaces (``fast_path=False``).
3. int8 vs fp32: decode tokens/s (engine, batch 1) and validation perplexity on the demo val shards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402

PROMPTS = ["The government said on Monday that", "Shares in the company rose after", "The film won the award for",
           "The minister told reporters that", "The new phone will be sold in", "The team's manager said"]


def pick_model(arg: str | None, preset: str | None = None) -> Path:
    if arg:
        return Path(arg)
    from pipeline.compress.run import resolve_model

    if preset is None:
        try:
            return resolve_model("jobs/configs/pretrain_demo.yaml")
        except ValueError:
            pass
    import transformers

    from pipeline.model.build import ModelConfig, build_model

    tok = transformers.AutoTokenizer.from_pretrained(str(next(Path("outputs/prepare").glob("*/tokenizer"))))
    out = Path(tempfile.mkdtemp()) / (preset or "small")
    build_model(ModelConfig(preset=preset or "small", max_seq_len=256), len(tok), tok.pad_token_id,
                tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_clients(fn, n: int, concurrency: int) -> dict:
    lat, batch = [], []

    def one(i):
        t = time.perf_counter()
        size = fn(i)
        lat.append(time.perf_counter() - t)
        if size is not None:
            batch.append(size)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"requests_per_s": n / wall, "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
            "mean_batch": statistics.mean(batch) if batch else None}


def bench_http(model_dir: Path, n: int, max_tokens: int, levels: list[int]) -> tuple[dict, dict]:
    import ray
    import requests

    from pipeline.config import from_dict
    from pipeline.serve.app import ServeConfig
    from pipeline.serve.launch import start

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = from_dict(ServeConfig, {"port": 8123, "feedback_db": str(Path(tempfile.mkdtemp()) / "fb.sqlite"),
                                  "models": [{"name": "m", "path": str(model_dir), "max_batch_size": 16,
                                              "batch_wait_ms": 20, "max_queue": 256, "max_ongoing_requests": 64,
                                              "max_queued_requests": 256, "cpus": 0.5, "threads": 1}]})
    url = start(cfg)
    session = requests.Session()

    def call(i):
        r = session.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS[i % len(PROMPTS)],
                                                        "max_tokens": max_tokens, "temperature": 0}, timeout=300)
        r.raise_for_status()
        return int(r.headers["X-Batch-Size"])  # the engine batch this request ran in
    for i in range(4):
        call(i)  # warm-up
    ttft = []
    for i in range(12):
        t = time.perf_counter()
        with requests.post(url + "/v1/completions", stream=True, timeout=300, json={
                "model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            first = None
            for line in r.iter_lines(decode_unicode=True):  # read to the end: the next request starts clean
                if first is None and line.startswith("data: ") and line != "data: [DONE]":
                    first = time.perf_counter() - t  # the first text chunk (sent once it has text)
            ttft.append(first)
    results = {c: run_clients(call, n, c) for c in levels}
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return results, {"ttft_p50_s": statistics.median(ttft), "ttft_p95_s": percentile(ttft, 0.95)}


def bench_baseline(model_dir: Path, n: int, max_tokens: int, levels: list[int]) -> dict:
    import torch
    import transformers

    torch.set_num_threads(1)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    lock = threading.Lock()

    def call(i):
        ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
        with lock, torch.inference_mode():
            model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    for i in range(2):
        call(i)
    return {c: run_clients(call, n, c) for c in levels}


def bench_engine(model_dir: Path, tokens: int, repeats: int, lm_data: str | None, batches: tuple[int, ...] = ()) -> dict:
    import torch

    from pipeline.compress.quantize import load_model, quantize_int8
    from pipeline.serve.engine import Engine, SamplingParams

    torch.set_num_threads(1)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = {}
    fp32 = load_model(model_dir)
    calibration = None  # as the compress job does: activation scales fixed on training rows
    if lm_data:
        from pipeline.compress.run import CompressEvalConfig, _lm_rows

        calibration = [{"input_ids": torch.tensor([r])} for r in _lm_rows(CompressEvalConfig(lm_data=lm_data), "train", 64)]
    int8 = quantize_int8(load_model(model_dir), calibration)
    out["int8_activations"] = "calibrated" if calibration else "dynamic"
    # name: (model, KV cache, engine fast path); repeats alternate over the variants so that
    # machine noise hits all of them
    variants = {"kv_cache": (fp32, True, True), "no_cache": (fp32, False, True), "int8_kv_cache": (int8, True, True),
                "hf_kv_cache": (fp32, True, False), "hf_int8_kv_cache": (int8, True, False)}
    engines = {k: Engine(m, tok, max_batch_size=1, fast_path=f) for k, (m, _, f) in variants.items()}
    prompt = engines["kv_cache"].encode(PROMPTS[0])
    n = min(tokens, engines["kv_cache"].context_length - len(prompt))
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, e in engines.items():
            t = time.perf_counter()
            g = e.generate([(prompt, SamplingParams(max_tokens=n, temperature=0))], use_cache=variants[name][1])[0]
            speeds[name].append(len(g.token_ids) / (time.perf_counter() - t))
            out[name] = {"tokens": len(g.token_ids)}
    for name, v in speeds.items():
        out[name]["tokens_per_s"] = statistics.median(v)
    for b in batches:
        # decode throughput with `b` requests decoded together (the batches continuous batching
        # forms under load): fp32 and int8 alternate, median of `repeats` each
        sides: dict[str, list[float]] = {"fp32": [], "int8": []}
        engines = {"fp32": Engine(fp32, tok, max_batch_size=b), "int8": Engine(int8, tok, max_batch_size=b)}
        reqs = [(engines["fp32"].encode(PROMPTS[i % len(PROMPTS)]), SamplingParams(max_tokens=64, temperature=0, stop=()))
                for i in range(b)]
        for e in engines.values():
            e.generate(reqs)  # warm-up
        for _ in range(repeats):
            for name, e in engines.items():
                t = time.perf_counter()
                gens = e.generate(reqs)
                sides[name].append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t))
        out[f"batch_{b}"] = {k: statistics.median(v) for k, v in sides.items()}
    if lm_data:
        from pipeline.compress.run import CompressEvalConfig, _lm_rows
        from pipeline.evaluate.lm import lm_metrics_from_rows

        rows = _lm_rows(CompressEvalConfig(lm_data=lm_data, lm_rows=64))
        out["fp32_val_perplexity"] = lm_metrics_from_rows(fp32, tok, rows)["perplexity"]
        out["int8_val_perplexity"] = lm_metrics_from_rows(int8, tok, rows)["perplexity"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--preset", help="benchmark a freshly built (untrained) model of this preset, e.g. gpt2-124m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lm-data", default="jobs/configs/prepare_demo.yaml")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--int8-batches", type=int, nargs="*", default=[],
                   help="also compare int8 and fp32 decode throughput with this many requests per batch")
    p.add_argument("--rounds", type=int, default=1, help="repeat the HTTP comparison; medians are reported")
    a = p.parse_args()
    model_dir = pick_model(a.model, a.preset)
    levels = [1, 4, 16]
    print(f"machine: {machine()}; model: {model_dir}")
    if not a.skip_engine:
        report_engine(bench_engine(model_dir, a.decode_tokens, a.repeats, a.lm_data, tuple(a.int8_batches)))
    if a.skip_http:
        return
    rounds = []  # (baseline, serve, ttft) per round; the two sides alternate so noise hits both
    for _ in range(a.rounds):
        base = bench_baseline(model_dir, a.requests, a.max_tokens, levels)
        rounds.append((base, *bench_http(model_dir, a.requests, a.max_tokens, levels)))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\n{a.rounds} round(s); medians over rounds")
    print("| concurrency | Serve req/s | Serve p50 s | Serve p95 s | mean batch | HF generate req/s | HF p50 s | HF p95 s "
          "| ratio (median) | ratio per round |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in levels:
        ss, bs = [r[1][c] for r in rounds], [r[0][c] for r in rounds]
        ratios = [s["requests_per_s"] / b["requests_per_s"] for s, b in zip(ss, bs)]
        g = lambda rows, k: med([r[k] for r in rows])  # noqa: E731
        print(f"| {c} | {g(ss, 'requests_per_s'):.2f} | {g(ss, 'p50_s'):.3f} | {g(ss, 'p95_s'):.3f} | "
              f"{g(ss, 'mean_batch'):.1f} | {g(bs, 'requests_per_s'):.2f} | {g(bs, 'p50_s'):.3f} | {g(bs, 'p95_s'):.3f} | "
              f"{med(ratios):.2f}x | {', '.join(f'{r:.2f}' for r in ratios)} |")
    ttft = [r[2] for r in rounds]
    print(f"\nTTFT (streamed, concurrency 1): p50 {med([t['ttft_p50_s'] for t in ttft]) * 1000:.1f} ms, "
          f"p95 {med([t['ttft_p95_s'] for t in ttft]) * 1000:.1f} ms")


def report_engine(eng: dict) -> None:
    print(json.dumps(eng, indent=1))
    print(f"KV cache vs no cache: {eng['kv_cache']['tokens_per_s'] / eng['no_cache']['tokens_per_s']:.2f}x "
          f"({eng['kv_cache']['tokens']} tokens, batch 1)")
    print(f"int8 ({eng['int8_activations']} activation scales) vs fp32 decode: "
          f"{eng['int8_kv_cache']['tokens_per_s'] / eng['kv_cache']['tokens_per_s']:.2f}x")
    print(f"engine fast path vs transformers forward (KV cache, batch 1): fp32 "
          f"{eng['kv_cache']['tokens_per_s'] / eng['hf_kv_cache']['tokens_per_s']:.2f}x, int8 "
          f"{eng['int8_kv_cache']['tokens_per_s'] / eng['hf_int8_kv_cache']['tokens_per_s']:.2f}x "
          f"(int8 vs fp32 on the transformers forward: "
          f"{eng['hf_int8_kv_cache']['tokens_per_s'] / eng['hf_kv_cache']['tokens_per_s']:.2f}x)")
    for k, v in eng.items():
        if k.startswith("batch_"):
            print(f"int8 vs fp32 decode, {k.split('_')[1]} requests per batch: {v['int8'] / v['fp32']:.2f}x "
                  f"({v['fp32']:.0f} -> {v['int8']:.0f} tokens/s)")
    if "int8_val_perplexity" in eng:
        print(f"int8 perplexity change: {eng['int8_val_perplexity'] / eng['fp32_val_perplexity'] - 1:+.2%}")


if __name__ == "__main__":
    main()
