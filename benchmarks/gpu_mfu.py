"""GPU benchmark without Ray: gpt2-124M training throughput and MFU in bf16 on one GPU.

    python benchmarks/gpu_mfu.py [--batch 16] [--seq-len 1024] [--steps 30] [--compile]

Needs only torch + transformers (Ray is not imported): the same ``Trainer.train_step`` that Ray
Train workers run, on random tokens (vocab 50,257), bf16 autocast, fused AdamW, SDPA attention.
MFU = tokens/s x training FLOPs per token / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import torch

    from pipeline.model.build import ModelConfig, build_model, flops_per_token, num_params
    from pipeline.train.loop import LoopConfig, OptimConfig, Trainer
    from pipeline.train.ray_train import peak_flops

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(ModelConfig(preset="gpt2-124m", max_seq_len=args.seq_len), 50257).to(device)
    fpt = flops_per_token(model, args.seq_len)
    if args.compile:
        model = torch.compile(model)
    trainer = Trainer(model, OptimConfig(), LoopConfig(max_steps=10_000, precision="bf16"), device)
    x = torch.randint(0, 50257, (args.batch, args.seq_len), device=device)
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step([{"input_ids": x, "labels": x}], step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[args.warmup:])
    tps = args.batch * args.seq_len / dt
    peak = peak_flops(device)
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; compile={args.compile}")
    print(f"gpt2-124M: {num_params(model) / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, bf16 autocast")
    print(f"step {dt * 1000:.1f} ms, {tps:,.0f} tokens/s, {fpt / 1e9:.2f} GFLOP/token")
    print(f"MFU: {tps * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: unknown peak for this device")


if __name__ == "__main__":
    main()
