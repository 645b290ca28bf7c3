"""GPU benchmark without Ray: gpt2-124M training throughput and MFU in bf16 on one GPU.

    python benchmarks/gpu_mfu.py [--variants gpt2:bf16:eager:16,gpt2:bf16:compile:16,...]
                                 [--seq-len 1024] [--steps 30] [--warmup 10] [--json out.json]
                                 [--smoke]

Needs only torch + transformers (Ray is not imported): the same ``Trainer.train_step`` that Ray
Train workers run, on random tokens (vocab 50,257), fused AdamW, SDPA attention, gradient
clipping. A variant is ``arch:precision:mode:batch``: arch gpt2, llama or bert (the masked
objective's encoder; 12 layers x 768, the gpt2-124m preset), precision bf16 (autocast) or fp32 (TF32 matmuls), mode eager or compile
(``torch.compile``); an optional fifth field sets the vocabulary size (50,257 by default; 50,304
is it padded to a multiple of 64). Each variant reports the median step time over the steps after warm-up,
tokens/s and MFU = tokens/s x training FLOPs per token / peak dense bf16 FLOP/s of the device
(``flops_per_token``: 6N + 12 L d T, N counting the tied output projection).

``--smoke`` first checks the CUDA path of the training code end to end on a tiny model: a
``Trainer.fit`` with evaluation on the GPU (bf16 autocast), the loss falls, and the checkpoint
saved from it loads with ``from_pretrained`` and gives the same logits; then the same under FSDP
(NCCL, one rank), with the gathered checkpoint resuming a fresh sharded model exactly; then a
``torch.compile``d model through ``Trainer.fit``, saved from its compiled wrapper and reloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VARIANTS = ("gpt2:bf16:eager:16,gpt2:bf16:compile:16,gpt2:bf16:compile:32,"
                    "gpt2:fp32:eager:16,llama:bf16:compile:16")


def smoke(torch, device, compile: bool = False) -> dict:
    """The GPU path of Trainer.fit, estimate_loss and save_checkpoint, on a tiny model: the loss
    falls, and the saved checkpoint loads with ``from_pretrained`` and gives the same logits.
    ``compile``: the model ``torch.compile``d (``train.compile``), saved from its compiled
    wrapper; its logits then match up to the fused kernels' rounding."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.build import ModelConfig, build_model
    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer

    torch.manual_seed(0)
    vocab, seq = 512, 64
    model = build_model(ModelConfig(preset="tiny", max_seq_len=seq), vocab).to(device)
    if compile:
        model = torch.compile(model)
    # a learnable stream: each row counts up from a random start (mod vocab)
    starts = torch.randint(0, vocab, (64, 1))
    data = (starts + torch.arange(seq)) % vocab

    def batches(_epoch=0):
        for i in range(0, len(data), 8):
            yield {"input_ids": data[i:i + 8], "labels": data[i:i + 8]}

    loop = LoopConfig(max_steps=60, batch_size=8, eval_every=20, eval_batches=2, log_every=10, precision="auto",
                      compile=compile)
    trainer = Trainer(model, OptimConfig(lr=3e-3, warmup_steps=5), loop, device)
    evals = []
    t = time.perf_counter()
    state = trainer.fit(TrainState(), batches, lambda: batches(), on_eval=lambda m, s, last: evals.append(m))
    seconds = time.perf_counter() - t
    losses = [r["loss"] for r in state.history]
    model.eval()
    x = data[:4].to(device)
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, optimizer=trainer.optimizer, state=state)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
        with torch.no_grad():
            out = loaded(input_ids=x).logits.float()
    result = {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": evals[-1]["val_loss"],
              "evaluations": len(evals), "fit_s": seconds, "loaded_class": type(loaded).__name__,
              "logits_max_abs_diff": float((out - ref).abs().max())}
    assert losses[-1] < losses[0] * 0.5, f"loss did not fall on GPU: {losses}"
    assert result["logits_max_abs_diff"] < (1e-3 if compile else 1e-4), result
    return result


def fsdp_smoke(torch, device) -> dict:
    """The FSDP path on CUDA (NCCL, one rank: the machine has one GPU): shard a tiny model, train
    under bf16 autocast, gather the full weights and optimizer state into a checkpoint, load it
    with ``from_pretrained`` and resume a fresh sharded model from it."""
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from pipeline.model.build import ModelConfig, build_model
    from pipeline.train.checkpoint import load_model_weights, load_training_state, save_checkpoint
    from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer
    from pipeline.train.sharding import full_state, is_sharded, shard_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        vocab, seq = 512, 64
        starts = torch.randint(0, vocab, (32, 1), generator=torch.Generator().manual_seed(0))
        data = ((starts + torch.arange(seq)) % vocab).to(device)

        def make(seed):
            model = shard_model(build_model(ModelConfig(preset="tiny", max_seq_len=seq), vocab, seed=seed), device)
            return model, Trainer(model, OptimConfig(lr=3e-3, warmup_steps=5), LoopConfig(max_steps=100), device)

        def run(trainer, first, last):
            return [trainer.train_step([{"input_ids": data[(s % 4) * 8:(s % 4) * 8 + 8],
                                         "labels": data[(s % 4) * 8:(s % 4) * 8 + 8]}], s)[0] for s in range(first, last)]

        model, trainer = make(0)
        assert is_sharded(model)
        losses = run(trainer, 0, 40)
        model_state, optim_state = full_state(model, trainer.optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model, optimizer=trainer.optimizer, state=TrainState(step=40),
                            model_state=model_state, optimizer_state=optim_state)
            loaded = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
            model.eval()
            with torch.no_grad():
                diff = float((loaded(input_ids=data[:4]).logits - model(input_ids=data[:4]).logits).abs().max())
            model.train()
            continued = run(trainer, 40, 45)
            fresh = build_model(ModelConfig(preset="tiny", max_seq_len=seq), vocab, seed=1)
            load_model_weights(fresh, tmp)
            fresh = shard_model(fresh, device)
            resumed_trainer = Trainer(fresh, OptimConfig(lr=3e-3, warmup_steps=5), LoopConfig(max_steps=100), device)
            state, _ = load_training_state(tmp, resumed_trainer.optimizer, fresh)
            resumed = run(resumed_trainer, state.step, 45)
        result = {"first_loss": losses[0], "last_loss": losses[-1], "logits_max_abs_diff": diff,
                  "resume_max_loss_diff": max(abs(a - b) for a, b in zip(continued, resumed))}
        assert losses[-1] < losses[0] * 0.5, losses
        assert diff < 1e-4 and result["resume_max_loss_diff"] < 1e-3, result
        return result
    finally:
        dist.destroy_process_group()


def run_variant(torch, device, spec: str, seq_len: int, steps: int, warmup: int) -> dict:
    from pipeline.model.build import ModelConfig, build_model, flops_per_token, num_params
    from pipeline.train.loop import LoopConfig, OptimConfig, Trainer
    from pipeline.train.ray_train import peak_flops

    arch, precision, mode, batch, *rest = spec.split(":")
    batch, vocab = int(batch), int(rest[0]) if rest else 50257
    torch.manual_seed(0)
    # "bert": the masked objective's encoder at the same size (its loss here over every position)
    model_cfg = ModelConfig(preset="gpt2-124m", max_seq_len=seq_len, **(
        {"objective": "masked"} if arch == "bert" else {"arch": arch}))
    model = build_model(model_cfg, vocab, pad_id=0 if arch == "bert" else None).to(device)
    fpt = flops_per_token(model, seq_len)
    params = num_params(model)
    if mode == "compile":
        model = torch.compile(model)
    trainer = Trainer(model, OptimConfig(), LoopConfig(max_steps=10_000, precision=precision), device)
    x = torch.randint(0, 50257, (batch, seq_len), device=device)  # same tokens whatever the vocab size
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = trainer.train_step([{"input_ids": x, "labels": x}], step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    dt = statistics.median(times[warmup:])
    tps = batch * seq_len / dt
    peak = peak_flops(device)
    result = {"variant": spec, "params_m": params / 1e6, "batch": batch, "seq_len": seq_len,
              "step_ms": dt * 1000, "first_step_s": times[0], "tokens_per_s": tps, "gflop_per_token": fpt / 1e9,
              "mfu": tps * fpt / peak if peak else None, "peak_tflops": peak / 1e12,
              "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "loss_first": losses[0], "loss_last": losses[-1]}
    del trainer, model, x
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "transformers": transformers.__version__, "variants": []}
    print(f"device: {out['device']}; torch {out['torch']}; transformers {out['transformers']}", flush=True)
    if args.smoke:
        out["smoke"] = smoke(torch, device)
        print("smoke:", json.dumps(out["smoke"]), flush=True)
        out["fsdp_smoke"] = fsdp_smoke(torch, device)
        print("fsdp smoke:", json.dumps(out["fsdp_smoke"]), flush=True)
        out["compile_smoke"] = smoke(torch, device, compile=True)
        print("compile smoke:", json.dumps(out["compile_smoke"]), flush=True)
    for spec in args.variants.split(","):
        try:
            r = run_variant(torch, device, spec, args.seq_len, args.steps, args.warmup)
        except Exception as e:  # one failing variant (e.g. compile unavailable) must not hide the rest
            r = {"variant": spec, "error": f"{type(e).__name__}: {e}"[:500]}
            torch.cuda.empty_cache()
        out["variants"].append(r)
        if "error" in r:
            print(f"{spec}: ERROR {r['error']}", flush=True)
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown peak"
            print(f"{spec}: {r['params_m']:.1f}M params, step {r['step_ms']:.1f} ms (first {r['first_step_s']:.1f} s), "
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['gflop_per_token']:.3f} GFLOP/token, MFU {mfu}, "
                  f"{r['max_mem_gib']:.1f} GiB, loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
