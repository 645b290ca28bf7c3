"""int8 vs fp32 on a trained model of gpt2-124M's shape: decode speed-up and perplexity change.

    python benchmarks/int8_trained.py --prepared outputs/prepare/<run> [--steps 600]
        [--preset gpt2-124m] [--tokens 128] [--repeats 3] [--json out.json]

The demo's model (4 x 256) is too small for int8 to pay at batch 1 (BENCHMARKS.md); this script
measures both of the issue's int8 figures on a model whose matrix products dominate decoding:
1. Pretrain a GPT-2 of ``--preset`` (12 layers x 768 for gpt2-124m; vocabulary: the prepare
   output's tokenizer) on the prepare output's train shards for ``--steps`` steps of 16 x 256
   tokens (on the GPU when there is one, bf16 autocast; no Ray).
2. On the CPU, as the compress job does: int8 with activation scales calibrated on 64 training
   rows (``quantize_int8``), then validation perplexity of both on 64 val rows (all threads),
   and the serving engine's batch-1 greedy decode tokens/s on one thread (``--tokens`` new tokens,
   fp32 and int8 alternating, median of ``--repeats``), and at batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks.classifier_study import pretrain  # noqa: E402

PROMPTS = ["The government said on Monday that", "Shares in the company rose after", "The film won the award for",
           "The minister told reporters that"]


def decode_speed(models: dict, tok, batch: int, tokens: int, repeats: int) -> dict:
    import torch

    from pipeline.serve.engine import Engine, SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engines = {k: Engine(m, tok, max_batch_size=batch) for k, m in models.items()}
        reqs = [(engines["fp32"].encode(PROMPTS[i % len(PROMPTS)]), SamplingParams(max_tokens=tokens, temperature=0, stop=()))
                for i in range(batch)]
        for e in engines.values():
            e.generate([(p, SamplingParams(max_tokens=8, temperature=0, stop=())) for p, _ in reqs])  # warm-up
        speeds: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(repeats):
            for name, e in engines.items():
                t = time.perf_counter()
                gens = e.generate(reqs)
                speeds[name].append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t))
        out = {k: statistics.median(v) for k, v in speeds.items()}
        out["speedup"] = out["int8"] / out["fp32"]
        return out
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import platform

    import torch
    import transformers

    from pipeline.compress.quantize import load_model, quantize_int8
    from pipeline.compress.run import CompressEvalConfig, _lm_rows
    from pipeline.evaluate.lm import lm_metrics_from_rows
    from pipeline.model.build import num_params

    out: dict = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    model_dir = tempfile.mkdtemp(prefix="int8trained-")
    out["pretrain"] = pretrain(args.prepared, args.steps, model_dir, preset=args.preset,
                               precision="bf16" if torch.cuda.is_available() else "fp32", lr=args.lr)
    print("pretrain", out["pretrain"], flush=True)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    e = CompressEvalConfig(lm_data=args.prepared, lm_rows=64)
    fp32 = load_model(Path(model_dir)).eval()
    t = time.perf_counter()
    int8 = quantize_int8(load_model(Path(model_dir)), [{"input_ids": torch.tensor([r])} for r in _lm_rows(e, "train", 64)])
    out["quantize_s"] = time.perf_counter() - t
    out["params"] = num_params(fp32)
    rows = _lm_rows(e)
    out["fp32_val_perplexity"] = lm_metrics_from_rows(fp32, tok, rows)["perplexity"]
    out["int8_val_perplexity"] = lm_metrics_from_rows(int8, tok, rows)["perplexity"]
    out["perplexity_change"] = out["int8_val_perplexity"] / out["fp32_val_perplexity"] - 1
    print({k: out[k] for k in ("params", "fp32_val_perplexity", "int8_val_perplexity", "perplexity_change")}, flush=True)
    for batch in (1, 4):
        out[f"batch_{batch}"] = decode_speed({"fp32": fp32, "int8": int8}, tok, batch, args.tokens, args.repeats)
        print(f"batch {batch}", out[f"batch_{batch}"], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
