"""One training step (``Trainer.train_step``: forward, backward, AdamW; no Ray) under two settings,
same model and batch, rounds alternating so that a shared machine's noise hits both.

``--compare activation``: GPT-2's GELU spelled two ways: transformers' "gelu_new" (the tanh
approximation as a chain of elementwise ops in Python, what OpenAI's GPT-2 configs name) against
"gelu_pytorch_tanh" (the same function in one fused torch kernel, what ``build_model`` configures).

``--compare precision``: fp32 against ``train.precision: bf16-native`` (bf16 autocast where the
device multiplies bf16 in hardware: a GPU, or a CPU with AMX or AVX512-BF16; on any other CPU both
run fp32).

``--compare attention``: ``train.attention`` sdpa (torch's scaled_dot_product_attention) against
eager (transformers' matmul, softmax, matmul), the same function.

``--compare compile``: the model as it is against ``torch.compile(model)`` (``train.compile``).
Each round also reports its first step, which holds the compilation: cold in the first compiled
round on a machine whose inductor cache (``/tmp/torchinductor_$USER``) is empty, from the cache after.

    python benchmarks/bench_step.py --compare activation      # the demo's small preset, 1 CPU thread
    python benchmarks/bench_step.py --compare precision
    python benchmarks/bench_step.py --compare attention --precision bf16-native --batch 43 --seq-len 128
    python benchmarks/bench_step.py --compare compile --precision bf16-native --steps 25 --warmup 5
    python benchmarks/bench_step.py --compare activation --device cuda --preset gpt2-124m --vocab 50304 \
        --seq-len 1024 --batch 16

Each round reports the median step after the warm-up steps, the summary the median over rounds
and the ratio (first setting's time / second's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402

SETTINGS = {"activation": (("activation", "gelu_new"), ("activation", "gelu_pytorch_tanh")),
            "precision": (("precision", "fp32"), ("precision", "bf16-native")),
            "attention": (("attention", "sdpa"), ("attention", "eager")),
            "compile": (("compile", "no-compile"), ("compile", "compile"))}


def step_time(torch, device, preset: str, act: str, vocab: int, batch: int, seq_len: int, steps: int, warmup: int,
              precision: str, attention: str = "sdpa", compile: bool = False) -> tuple[float, float, float]:
    """Median seconds per step after ``warmup`` steps, the first loss, and the first step's seconds."""
    from transformers.activations import ACT2FN

    from pipeline.model.build import ModelConfig, build_model
    from pipeline.train.loop import LoopConfig, OptimConfig, Trainer

    model = build_model(ModelConfig(preset=preset, max_seq_len=seq_len), vocab, seed=0)
    model.config.activation_function = act
    for block in model.transformer.h:
        block.mlp.act = ACT2FN[act]
    model.to(device)
    if compile:
        model = torch.compile(model)
    trainer = Trainer(model, OptimConfig(), LoopConfig(max_steps=10_000, precision=precision, attention=attention), device)
    x = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times, first_loss = [], None
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = trainer.train_step([{"input_ids": x, "labels": x}], step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        first_loss = loss if first_loss is None else first_loss
    return statistics.median(times[warmup:]), first_loss, times[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compare", choices=sorted(SETTINGS), default="activation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=8192, help="the demo tokenizer's size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="with --compare activation or attention: auto is bf16 "
                                                             "autocast on a GPU, fp32 on CPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pair = SETTINGS[args.compare]
    names = [value for _, value in pair]
    rounds: dict[str, list[float]] = {n: [] for n in names}
    first_steps: dict[str, list[float]] = {n: [] for n in names}
    losses = {}
    for r in range(args.rounds):
        for key, value in (pair if r % 2 == 0 else pair[::-1]):
            setting = {"act": "gelu_pytorch_tanh", "precision": args.precision, "attention": "sdpa", "compile": "no-compile",
                       {"activation": "act"}.get(key, key): value}
            t, losses[value], first = step_time(torch, device, args.preset, setting["act"], args.vocab, args.batch,
                                                args.seq_len, args.steps, args.warmup, setting["precision"],
                                                setting["attention"], setting["compile"] == "compile")
            rounds[value].append(t)
            first_steps[value].append(first)
            print(f"round {r}: {value}: {t * 1000:.1f} ms per step, first step {first:.1f} s "
                  f"(first loss {losses[value]:.5f})", flush=True)
    med = {n: statistics.median(v) for n, v in rounds.items()}
    speedup = med[names[0]] / med[names[1]]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
           "args": vars(args), "step_ms": {n: [t * 1000 for t in v] for n, v in rounds.items()},
           "median_ms": {n: t * 1000 for n, t in med.items()}, "first_step_s": first_steps, "speedup": speedup, "first_loss": losses}
    print(f"machine: {out['device']}", flush=True)
    print(f"median step: {names[0]} {med[names[0]] * 1000:.1f} ms, {names[1]} {med[names[1]] * 1000:.1f} ms: "
          f"{speedup:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
