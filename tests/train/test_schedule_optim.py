import math

import pytest
import torch

from pipeline.model.build import ModelConfig, build_model
from pipeline.train.loop import LoopConfig, OptimConfig, Trainer
from pipeline.train.optim import param_groups
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig
from pipeline.train.schedule import get_lr, schedule_warning


def test_lr_schedule():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert get_lr(0, **kw) == pytest.approx(0.1)
    assert get_lr(9, **kw) == pytest.approx(1.0)
    assert get_lr(10, **kw) == pytest.approx(1.0)
    assert get_lr(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert get_lr(110, **kw) == pytest.approx(0.1) and get_lr(500, **kw) == pytest.approx(0.1)
    lrs = [get_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert get_lr(0, lr=1.0, warmup_steps=0, max_steps=10, min_lr=0.0) == pytest.approx(1.0)


def test_a_warmup_longer_than_the_run_is_named():
    assert schedule_warning(lr=1e-3, warmup_steps=10, max_steps=10) is None  # the last step reaches lr
    warning = schedule_warning(lr=1e-3, warmup_steps=1000, max_steps=3)
    assert "optim.warmup_steps (1000) > train.max_steps (3)" in warning and "peaks at 3e-06" in warning


def test_no_weight_decay_on_biases_norms_embeddings():
    model = build_model(ModelConfig(preset="tiny", max_seq_len=32), 100)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in decayed)
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.wte.weight", "transformer.wpe.weight",
                                                            "transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls, kwargs, key", [
    (OptimConfig, dict(lr=0), "optim.lr"),
    (OptimConfig, dict(beta2=1.0), "optim.beta1/beta2"),
    (LoopConfig, dict(batch_size=0), "train.batch_size"),
    (LoopConfig, dict(early_stopping_patience=0), "train.early_stopping_patience"),
    (LoopConfig, dict(average_last=1.5), "train.average_last"),
    (LoopConfig, dict(average_last=0.3, early_stopping_patience=2), "train.average_last"),
    (ScalingConfig, dict(ddp_bucket_cap_mb=0), "scaling.ddp_bucket_cap_mb"),
    (RunConfigCfg, dict(num_to_keep=0), "run.num_to_keep"),
])
def test_bad_values_name_the_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=key):
        cls(**kwargs)


def test_pretraining_refuses_a_checkpoint_metric_it_never_reports():
    from pipeline.train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="run.checkpoint_metric val_accuracy applies to classification fine-tuning only"):
        PretrainConfig(data="d", run=RunConfigCfg(checkpoint_metric="val_accuracy"))
    PretrainConfig(data="d", run=RunConfigCfg(checkpoint_metric="last"))


def test_a_run_resumed_at_its_last_step_evaluates_and_reports_once():
    """A rerun of a finished run (e.g. a sweep trial started again) trains no further but still
    reports its final metrics, so Ray Tune and Ray Train get a result with val_loss."""
    from pipeline.train.loop import TrainState, Trainer

    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 50)
    trainer = Trainer(model, OptimConfig(warmup_steps=0), LoopConfig(max_steps=3, eval_every=3, batch_size=2),
                      torch.device("cpu"))
    x = torch.randint(0, 50, (2, 16))
    reports = []
    state = trainer.fit(TrainState(step=3, history=[{"loss": 2.5}]), lambda epoch: iter([{"input_ids": x, "labels": x}]),
                        lambda: iter([{"input_ids": x, "labels": x}]),
                        on_eval=lambda m, st, last: reports.append((m, last)))
    assert state.step == 3 and len(reports) == 1
    metrics, last = reports[0]
    assert last and metrics["step"] == 3 and metrics["train_loss"] == 2.5 and metrics["val_loss"] > 0


def test_early_stopping_ends_the_run_after_patience_evaluations_without_improvement():
    """With a learning rate too small to move fp32 weights the validation loss never improves
    after the first evaluation: patience 2 stops the run at the third evaluation, and that
    evaluation is reported as the last (so the wrapper checkpoints and exports it)."""
    from pipeline.train.loop import TrainState, Trainer

    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 50)
    trainer = Trainer(model, OptimConfig(lr=1e-20, warmup_steps=0),
                      LoopConfig(max_steps=100, eval_every=2, batch_size=2, early_stopping_patience=2), torch.device("cpu"))
    x = torch.randint(0, 50, (2, 16))
    reports = []
    state = trainer.fit(TrainState(), lambda epoch: iter([{"input_ids": x, "labels": x}] * 4),
                        lambda: iter([{"input_ids": x, "labels": x}]),
                        on_eval=lambda m, st, last: reports.append((m["step"], m["val_loss"], last)))
    assert state.step == 6 and [(s, last) for s, _, last in reports] == [(2, False), (4, False), (6, True)]
    assert reports[0][1] == reports[1][1] == reports[2][1]


def test_the_exported_checkpoint_is_the_best_by_its_metric():
    from pipeline.train.runner import best_checkpoint

    # the order Ray 2.60 gives Result.best_checkpoints: worst first
    kept = [("c150", {"step": 150, "val_loss": 6.15, "val_accuracy": 0.94}),
            ("c200", {"step": 200, "val_loss": 6.07, "val_accuracy": 0.93}),
            ("c300", {"step": 300, "val_loss": 6.10, "val_accuracy": 0.94})]
    assert best_checkpoint(kept, None)[0] == "c200"
    assert best_checkpoint(kept, "val_loss")[0] == "c200"
    assert best_checkpoint(kept, "val_accuracy")[0] == "c300"  # a tie goes to the later step
    assert best_checkpoint([("a", None), ("b", {})], "val_loss")[0] == "b"
    assert best_checkpoint(kept, "last")[0] == best_checkpoint(kept[::-1], "last")[0] == "c300"
    assert best_checkpoint([("a", None), ("b", {})], "last")[0] == "b"


def test_bf16_native_autocasts_only_where_the_device_multiplies_bf16(monkeypatch):
    """``precision: bf16-native``: bf16 autocast on a CPU with AMX tiles or AVX512-BF16 (and on
    CUDA), fp32 on any other CPU, where bf16 is emulated; ``auto`` stays fp32 on every CPU."""
    from pipeline.train.loop import CPU_BF16_PROBES, autocast_context, native_bf16

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    ctx = autocast_context(cpu, "bf16-native")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast_context(cpu, "auto"), torch.autocast)
    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 64, seed=0)
    trainer = Trainer(model, OptimConfig(lr=1e-3, warmup_steps=1), LoopConfig(max_steps=2, precision="bf16-native"), cpu)
    x = torch.arange(32).reshape(2, 16) % 64
    with autocast_context(cpu, "bf16-native"):
        assert model(input_ids=x).logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    loss, _ = trainer.train_step([{"input_ids": x, "labels": x}], 0)
    assert math.isfinite(loss) and all(p.dtype == torch.float32 for p in model.parameters())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16(cpu) and not isinstance(autocast_context(cpu, "bf16-native"), torch.autocast)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # e.g. AMD Zen 4 and 5
    assert native_bf16(cpu) and isinstance(autocast_context(cpu, "bf16-native"), torch.autocast)
    for probe in CPU_BF16_PROBES:
        monkeypatch.delattr(torch.cpu, probe)
    assert not native_bf16(cpu)  # a torch without the probes
    for native in (True, False):  # a GPU: its own report (an Ampere or later one multiplies bf16)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert native_bf16(torch.device("cuda")) is native


def _step_gradients(batches: list[dict], reduce=None, world_size: int = 1, seed: int = 0, grad_clip=None) -> dict:
    """The gradients one ``train_step`` over ``batches`` (micro-batches) hands to the optimizer."""
    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 64, seed=seed)
    trainer = Trainer(model, OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=grad_clip), LoopConfig(max_steps=2),
                      torch.device("cpu"))
    grads, step = {}, trainer.optimizer.step

    def spy(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    loss, _ = trainer.train_step(batches, 0, reduce, world_size)
    return {"loss": loss, **grads}


def test_accumulated_and_distributed_steps_weigh_every_loss_token_equally():
    """An SFT-like step: one micro-batch learns from 4 tokens, the other from 26. Accumulating
    them (grad_accum 2), or giving one to each of two workers (their token counts summed by
    ``reduce``; DDP averages the gradients), gives the gradient of the mean over all 30 tokens,
    as one batch of all four rows does, not the mean of the two micro-batch means."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (4, 16), generator=g)
    labels = x.clone()
    labels[:2, :-2] = -100  # rows 0-1: their last 2 tokens are targets (answers)
    labels[2:, :3] = -100  # rows 2-3: all but their first 3
    few, many = {"input_ids": x[:2], "labels": labels[:2]}, {"input_ids": x[2:], "labels": labels[2:]}
    whole = _step_gradients([{"input_ids": x, "labels": labels}])
    accumulated = _step_gradients([few, many])
    ranks = [_step_gradients([few], reduce=lambda t: t + 26, world_size=2),
             _step_gradients([many], reduce=lambda t: t + 4, world_size=2)]
    means = [_step_gradients([few]), _step_gradients([many])]
    params = [name for name in whole if name != "loss"]
    for name in params:
        assert torch.allclose(accumulated[name], whole[name], rtol=1e-4, atol=1e-7), name
        assert torch.allclose((ranks[0][name] + ranks[1][name]) / 2, whole[name], rtol=1e-4, atol=1e-7), name
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    # what averaging the two micro-batch means would have given: another gradient
    assert not all(torch.allclose((means[0][n] + means[1][n]) / 2, whole[n], rtol=1e-2, atol=1e-6) for n in params)


def test_gradient_clipping_and_the_final_learning_rate():
    """``optim.grad_clip``: the optimizer gets gradients of global norm at most that; ``optim.min_lr_ratio``:
    the cosine ends at that fraction of ``optim.lr``."""
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def norm(grads: dict) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for n, g in grads.items()
                                                           if n != "loss"])))

    assert norm(_step_gradients([{"input_ids": x, "labels": x}])) > 0.5
    assert norm(_step_gradients([{"input_ids": x, "labels": x}], grad_clip=0.5)) == pytest.approx(0.5, rel=1e-4)
    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 64, seed=0)
    trainer = Trainer(model, OptimConfig(lr=2e-3, warmup_steps=2, min_lr_ratio=0.25), LoopConfig(max_steps=10),
                      torch.device("cpu"))
    assert trainer.lr_at(1) == pytest.approx(2e-3) and trainer.lr_at(10) == pytest.approx(5e-4)


def test_a_run_without_validation_says_what_it_does_not_do():
    """Pretraining on a prepare output without val shards (split.val_fraction: 0) trains, and
    says up front that nothing is validated and early stopping cannot act."""
    from pipeline.train.runner import validation_warning

    assert validation_warning({"train": 1, "val": 2}, {"early_stopping_patience": 3}) is None
    warning = validation_warning({"train": 1}, {"early_stopping_patience": 3})
    assert "no validation split" in warning and "last is exported" in warning
    assert "train.early_stopping_patience (3) has no effect" in warning
    assert "early_stopping" not in validation_warning({"train": 1}, {"early_stopping_patience": None})


def test_filler_rows_carry_no_loss():
    """Filler rows (added so that a split's rows divide among Ray Train's workers) change neither
    the gradient, nor the validation loss, nor accuracy, whatever the objective; a batch of
    fillers only is skipped by validation, not a NaN."""
    from types import SimpleNamespace

    from pipeline.train.data import FILLER_ID, LMBatcher, filler_row
    from pipeline.train.loop import estimate_loss, label_tokens
    from pipeline.train.ray_train import equal_shares, filler_count

    assert [filler_count(n, 2) for n in (4, 5, 1)] == [0, 1, 1] and filler_count(10, 4) == 2
    assert equal_shares({"train": 5, "val": 4}, 2) == {"train": {"rows": 5, "per_worker": 3, "filler_rows": 1},
                                                       "val": {"rows": 4, "per_worker": 2, "filler_rows": 0}}
    assert filler_row({"input_ids": [5, 6, 7]}) == {"input_ids": [FILLER_ID] * 3}
    assert filler_row({"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 2})["labels"] == -100
    assert filler_row({"input_ids": [5, 6], "labels": [-100, 6]}) == {"input_ids": [5, 6], "labels": [-100, -100]}

    x = torch.randint(3, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    packed = torch.cat([x, torch.full((1, 16), FILLER_ID)])  # as the shards' filler file reads
    causal = LMBatcher("causal", special_ids=[0, 1, 2])(packed)
    assert (causal["labels"][3] == -100).all() and (causal["input_ids"][3] == 0).all()
    assert torch.equal(causal["labels"][:3], x) and label_tokens(causal, shifted=True) == 3 * 15
    masked = LMBatcher("masked", mask_id=1, vocab_size=64, special_ids=[0, 1, 2], seed=0)(packed)
    assert (masked["labels"][3] == -100).all() and (masked["input_ids"][3] == 0).all()

    plain = _step_gradients([{"input_ids": x, "labels": x}])
    padded = _step_gradients([causal])
    assert padded.pop("loss") == pytest.approx(plain.pop("loss"), rel=1e-6)
    for name in plain:
        assert torch.allclose(padded[name], plain[name], rtol=1e-4, atol=1e-7), name
    only_fillers = _step_gradients([{"input_ids": causal["input_ids"][3:], "labels": causal["labels"][3:]}],
                                   reduce=lambda t: t + 45, world_size=2)  # the other worker has the real rows
    assert all(not g.any() for n, g in only_fillers.items() if n != "loss")

    class Classifier(torch.nn.Module):  # logits from the first token; HF's loss (-100 ignored)
        def forward(self, input_ids, labels):
            logits = torch.nn.functional.one_hot(input_ids[:, 0] % 3, 3).float()
            return SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))

    ids = torch.tensor([[0, 5], [1, 5], [2, 5], [0, 5]])
    real = {"input_ids": ids[:3], "labels": torch.tensor([0, 1, 0])}  # 2 of 3 right
    with_filler = {"input_ids": ids, "labels": torch.tensor([0, 1, 0, -100])}
    fillers = {"input_ids": ids[3:], "labels": torch.tensor([-100])}
    cpu = torch.device("cpu")
    expected = estimate_loss(Classifier(), iter([real]), cpu)
    got = estimate_loss(Classifier(), iter([fillers, with_filler]), cpu)
    assert expected["val_accuracy"] == pytest.approx(2 / 3) and got == pytest.approx(expected)
    assert got["val_tokens"] == 3 and "val_ppl" not in got  # a class's cross-entropy has no perplexity


def test_the_tail_average_ends_the_run_on_the_mean_of_its_last_steps_and_resumes(tmp_path):
    """``train.average_last``: 0.4 of 5 steps ends the run on the mean of the weights after steps 4
    and 5, evaluated and reported as the last evaluation; a run interrupted at step 4 (inside the
    tail) and resumed from its checkpoint ends on the same mean."""
    from pipeline.train.checkpoint import load_model_weights, load_training_state, save_checkpoint
    from pipeline.train.loop import TailAverage, TrainState

    data = [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    train = lambda epoch: iter([{"input_ids": x, "labels": x} for x in data])
    val = lambda: iter([{"input_ids": data[0], "labels": data[0]}])

    def trainer(average_last: float, seed: int = 0) -> Trainer:
        return Trainer(build_model(ModelConfig(preset="tiny", max_seq_len=16), 50, seed=seed),
                       OptimConfig(lr=1e-2, warmup_steps=0),
                       LoopConfig(max_steps=5, eval_every=2, batch_size=2, log_every=1, average_last=average_last),
                       torch.device("cpu"))

    plain = trainer(0.0)
    after = {}
    plain.fit(TrainState(), train, val, on_log=lambda r: after.update(
        {r["step"]: {k: v.detach().clone() for k, v in plain.model.named_parameters()}}))
    averaged = trainer(0.4)
    assert averaged.cfg.averaged_steps == 2
    reports = []
    averaged.fit(TrainState(), train, val, on_eval=lambda m, st, last: reports.append((m, last)))
    for name, p in averaged.model.named_parameters():
        assert torch.allclose(p, (after[4][name] + after[5][name]) / 2, atol=1e-6), name
    assert not torch.allclose(after[4]["transformer.h.0.attn.c_attn.weight"],
                              after[5]["transformer.h.0.attn.c_attn.weight"])  # the mean is not a step's weights
    metrics, last = reports[-1]
    assert last and metrics["step"] == 5
    assert metrics["val_loss"] == pytest.approx(averaged_val_loss(averaged.model, data[0]), rel=1e-5)

    # interrupted after step 4's evaluation, resumed from its checkpoint by a fresh process
    first = trainer(0.4)

    def stop_at_4(metrics, state, is_last):
        if state.step == 4:
            save_checkpoint(tmp_path, first.model, optimizer=first.optimizer, state=state,
                            extra={"weight_average": first.average.state_dict()})
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(TrainState(), train, val, on_eval=stop_at_4)
    resumed = trainer(0.4, seed=1)
    load_model_weights(resumed.model, tmp_path)
    state, extra = load_training_state(tmp_path, resumed.optimizer)
    assert state.step == 4 and extra["weight_average"]["count"] == 1
    resumed.average.load_state_dict(extra["weight_average"])
    resumed.fit(state, train, val)
    for (name, p), q in zip(resumed.model.named_parameters(), averaged.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert isinstance(resumed.average, TailAverage) and resumed.average.count == 2


def averaged_val_loss(model, x) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def test_a_restarted_worker_group_continues_from_the_newest_checkpoint_on_storage(tmp_path):
    """Ray hands a replacement worker group the latest checkpoint its controller registered; one
    reported just before a worker died may be on storage only. The newer of the two is taken."""
    from types import SimpleNamespace

    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.loop import TrainState
    from pipeline.train.ray_train import resume_from

    model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 50)
    root = tmp_path / "ray"
    assert resume_from(None, str(root)) is None  # a first start
    four = save_checkpoint(root / "checkpoint_a", model, state=TrainState(step=4))
    eight = save_checkpoint(root / "checkpoint_b", model, state=TrainState(step=8))
    registered = lambda path: SimpleNamespace(path=str(path))
    assert resume_from(None, str(root)) == str(eight)  # a rerun after an error
    assert resume_from(registered(four), str(root)) == str(eight)  # step 8 reported, not registered yet
    assert resume_from(registered(eight), str(root)) == str(eight)
    (eight / "model.safetensors").write_bytes(b"cut")  # a copy cut short: not resumable, skipped
    assert resume_from(registered(four), str(root)) == str(four)


def test_eager_attention_trains_the_same_function_and_stays_out_of_the_export(tmp_path):
    """``train.attention: eager`` (faster on CPUs for short windows, BENCHMARKS.md) computes what
    the default (``auto``: our models' SDPA) does: one step gives the same loss and weights. It is
    the run's setting, reached through wrappers (the article-level classifier), and
    ``save_pretrained`` does not write it: the exported model loads with the default. An
    architecture without SDPA (GPT-Neo) keeps its own attention under ``auto`` and names the key
    when SDPA is asked for."""
    import transformers

    from pipeline.finetune.article import ArticleClassifier
    from pipeline.train.loop import unwrap

    x = torch.arange(64).reshape(4, 16) % 64
    after = {}
    for attention in ("auto", "eager"):
        model = build_model(ModelConfig(preset="tiny", max_seq_len=16), 64, seed=0)
        trainer = Trainer(model, OptimConfig(lr=1e-2, warmup_steps=0), LoopConfig(max_steps=2, attention=attention),
                          torch.device("cpu"))
        assert model.config._attn_implementation == {"auto": "sdpa"}.get(attention, attention)
        loss, _ = trainer.train_step([{"input_ids": x, "labels": x}], 0)
        after[attention] = (loss, model.transformer.h[0].attn.c_attn.weight.detach().clone())
    assert after["eager"][0] == pytest.approx(after["auto"][0], rel=1e-5)
    torch.testing.assert_close(after["eager"][1], after["auto"][1], rtol=0, atol=1e-4)  # 1% of the step
    model.save_pretrained(tmp_path)
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"

    config = build_model(ModelConfig(preset="tiny", max_seq_len=16), 64, seed=0).config
    wrapped = ArticleClassifier(transformers.GPT2ForSequenceClassification(config))
    Trainer(wrapped, OptimConfig(), LoopConfig(max_steps=2, attention="eager"), torch.device("cpu"))
    assert unwrap(wrapped).config._attn_implementation == "eager"

    neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        num_layers=1, attention_types=[[["global"], 1]], hidden_size=16, num_heads=2, vocab_size=64,
        max_position_embeddings=16))
    Trainer(neo, OptimConfig(), LoopConfig(max_steps=2), torch.device("cpu"))
    assert neo.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="train.attention"):
        Trainer(neo, OptimConfig(), LoopConfig(max_steps=2, attention="sdpa"), torch.device("cpu"))
