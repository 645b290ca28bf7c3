"""FSDP without Ray: two gloo processes on CPU shard a tiny GPT-2 and must train it exactly as one
process does with the whole batch; the checkpoint they save is a plain Hugging Face model, and
the optimizer state saved from the shards resumes the run exactly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.model.build import ModelConfig, build_model
from pipeline.train.loop import LoopConfig, OptimConfig, TailAverage, TrainState, Trainer

VOCAB, SEQ = 300, 32


def batch(step: int, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(100 + step))


def model_config(kind: str) -> ModelConfig:
    return ModelConfig(preset="tiny", max_seq_len=SEQ, **{"gpt2": {}, "llama": {"arch": "llama"},
                                                            "masked": {"objective": "masked"}}[kind])


def make_trainer(model, max_steps=10, grad_accum=1):
    return Trainer(model, OptimConfig(lr=3e-3, warmup_steps=1, weight_decay=0.1),
                   LoopConfig(max_steps=max_steps, grad_accum=grad_accum), torch.device("cpu"))


def steps(trainer, first: int, last: int, rank: int = 0, world: int = 1, grad_accum: int = 1) -> list[float]:
    """Optimizer steps first..last-1; each rank takes its rows of the global batch, split into
    ``grad_accum`` micro-batches."""
    losses = []
    for step in range(first, last):
        mine = batch(step)[rank::world].contiguous()
        micro = [{"input_ids": m, "labels": m} for m in mine.chunk(grad_accum)]
        losses.append(trainer.train_step(micro, step)[0])
    return losses


def _worker(rank: int, world: int, store: str, out_dir: str, grad_accum: int, kind: str) -> None:
    import torch.distributed as dist

    from pipeline.train.checkpoint import load_training_state, save_checkpoint
    from pipeline.train.sharding import full_state, is_sharded, shard_model

    torch.set_num_threads(1)
    # a file rendezvous: no port to pick, so nothing can take it between the pick and the bind
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = shard_model(build_model(model_config(kind), VOCAB, seed=0), torch.device("cpu"))
        assert is_sharded(model)
        trainer = make_trainer(model, grad_accum=grad_accum)
        steps(trainer, 0, 3, rank, world, grad_accum)
        model_state, optim_state = full_state(model, trainer.optimizer)  # every rank takes part
        if rank == 0:
            save_checkpoint(out_dir, model, optimizer=trainer.optimizer, state=TrainState(step=3),
                            model_state=model_state, optimizer_state=optim_state)
        dist.barrier()
        average = TailAverage(model)  # train.average_last over steps 3 and 4: each rank its own shards
        continued = []
        for step in (3, 4):
            continued += steps(trainer, step, step + 1, rank, world, grad_accum)
            average.update()
        gathered = average.state_dict()  # every rank takes part
        # a fresh sharded model resumed from the checkpoint continues the same way
        fresh = build_model(model_config(kind), VOCAB, seed=1)
        from pipeline.train.checkpoint import load_model_weights
        load_model_weights(fresh, out_dir)
        fresh = shard_model(fresh, torch.device("cpu"))
        resumed_trainer = make_trainer(fresh, grad_accum=grad_accum)
        state, _ = load_training_state(out_dir, resumed_trainer.optimizer, fresh)
        resumed = steps(resumed_trainer, state.step, 5, rank, world, grad_accum)
        reloaded = TailAverage(fresh)  # a resumed run shards the saved mean again
        reloaded.load_state_dict(gathered)
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict()["mean"].values(), gathered["mean"].values()))
        reloaded.apply()
        applied, _ = full_state(fresh, None)
        torch.save({"continued": continued, "resumed": resumed, "average": gathered, "applied": applied},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# gradient accumulation on GPT-2; Llama and the masked LM without (one step per batch)
@pytest.mark.parametrize("kind, grad_accum", [("gpt2", 2), ("llama", 1), ("masked", 1)])
def test_fsdp_trains_like_one_process_and_saves_a_plain_checkpoint(tmp_path, kind, grad_accum):
    import json

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), grad_accum, kind), nprocs=2, join=True)

    reference = build_model(model_config(kind), VOCAB, seed=0)
    trainer = make_trainer(reference)
    steps(trainer, 0, 3)  # one process, the whole global batch
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    loaded = auto.from_pretrained(str(tmp_path)).eval()
    reference.eval()
    x = batch(99)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-4)
    arch = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert arch == [type(reference).__name__]  # not FSDP's subclass name

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:  # resuming from the gathered optimizer state continues the run exactly
        assert r["resumed"] == pytest.approx(r["continued"], abs=1e-5)
    reference.train()
    average, ref_next = TailAverage(reference), []
    for step in (3, 4):
        ref_next += steps(trainer, step, step + 1)
        average.update()
    for name, mean in average.mean.items():  # the shards' mean, gathered, is the whole model's
        assert torch.allclose(ranks[0]["average"]["mean"][name], mean, atol=1e-4), name
        assert torch.equal(ranks[0]["applied"][name], ranks[0]["average"]["mean"][name]), name
    assert ranks[0]["average"]["count"] == 2
    # the mean of the two ranks' half-batch losses is the whole batch's loss
    for i in range(2):
        assert (ranks[0]["continued"][i] + ranks[1]["continued"][i]) / 2 == pytest.approx(ref_next[i], abs=1e-4)
