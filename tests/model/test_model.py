"""Model construction, the masked-LM corruption, checkpoint round trips and the golden losses."""

import logging
from pathlib import Path

import pytest
import torch

from pipeline.model.build import ModelConfig, build_model, flops_per_token, num_params
from pipeline.model.masking import mask_tokens
from pipeline.train.checkpoint import load_model_weights, save_checkpoint
from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer

VOCAB = 300
torch.set_num_threads(1)


def fixed_batch(seed=0, rows=4, seq=32):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: each row counts upward from a random start
    starts = torch.randint(0, VOCAB - seq, (rows, 1), generator=g)
    return starts + torch.arange(seq)


def tiny(**kw):
    return ModelConfig(preset="tiny", max_seq_len=64, **kw)


# First 10 training losses of the tiny GPT-2 (seed 0) on fixed_batch() with the settings of
# test_golden_losses, computed with torch 2.13.0 (CPU, 1 thread). A drift means the model, the
# optimizer or the loop changed behaviour.
GOLDEN = [5.7181, 5.3645, 5.0373, 4.8232, 4.6294, 4.4517, 4.2771, 4.1002, 3.924, 3.7491]


def golden_run(steps=10):
    model = build_model(tiny(pad_vocab_multiple=1), VOCAB, seed=0)  # the vocabulary the values were computed with
    trainer = Trainer(model, OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1), LoopConfig(max_steps=100),
                      torch.device("cpu"))
    x = fixed_batch()
    return [trainer.train_step([{"input_ids": x, "labels": x}], step)[0] for step in range(steps)]


def test_golden_losses():
    losses = golden_run()
    assert losses == pytest.approx(GOLDEN, rel=2e-3), [round(v, 4) for v in losses]
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("arch, objective", [("gpt2", "causal"), ("llama", "causal"), ("gpt2", "masked")])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, arch, objective):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model = build_model(tiny(arch=arch, objective=objective), VOCAB, pad_id=1, eos_id=0, seed=3).eval()
    x = fixed_batch(1)
    save_checkpoint(tmp_path, model)
    assert (tmp_path / "model.safetensors").exists()
    cls = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    other = build_model(tiny(arch=arch, objective=objective), VOCAB, pad_id=1, eos_id=0, seed=4).eval()
    load_model_weights(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_causal_loss_is_named_and_is_next_token_cross_entropy(arch):
    """transformers maps GPT2LMHeadModel to no loss name and logs, in every training process, that
    the loss type "is unrecognized" before falling back to next-token cross-entropy; the model
    names that loss, and its value is that cross-entropy."""
    model = build_model(tiny(arch=arch), VOCAB, seed=0)
    assert model.loss_type == "ForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_llama_and_presets():
    model = build_model(tiny(arch="llama", n_kv_head=1), VOCAB)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 1
    assert model.config._attn_implementation == "sdpa"
    assert num_params(build_model(ModelConfig(preset="small", max_seq_len=256), 8192)) > 4e6
    assert flops_per_token(model, 32) > 6 * (num_params(model) - model.get_input_embeddings().weight.numel())


@pytest.mark.parametrize("arch, objective", [("gpt2", "causal"), ("llama", "causal"), ("gpt2", "masked")])
def test_untied_embeddings_train_apart_and_round_trip(tmp_path, arch, objective):
    """``model.tie_embeddings: false``: the output layer is a matrix of its own (weight decay on it,
    not on the input embedding), and a checkpoint keeps both."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from pipeline.train.optim import param_groups

    tied = build_model(tiny(arch=arch, objective=objective), VOCAB, seed=0)
    model = build_model(tiny(arch=arch, objective=objective, tie_embeddings=False), VOCAB, seed=0)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is not emb and tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert num_params(model) >= num_params(tied) + head.numel()  # BERT's decoder also gets a bias of its own
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    assert id(head) in decay and id(emb) in no_decay
    save_checkpoint(tmp_path, model)
    cls = AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    x = fixed_batch(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, loaded(input_ids=x).logits)


def test_vocabulary_is_padded_to_the_multiple():
    assert build_model(tiny(), VOCAB).get_input_embeddings().weight.shape[0] == 320  # 300 up to 5 x 64
    exact = build_model(tiny(pad_vocab_multiple=1), VOCAB)
    assert exact.config.vocab_size == VOCAB and exact.get_output_embeddings().weight.shape[0] == VOCAB
    assert build_model(tiny(objective="masked", pad_vocab_multiple=128), VOCAB).config.vocab_size == 384


def test_flops_per_token_counts_every_matmul_once():
    # gpt2-124M: 85.0M weights in the blocks + the tied vocabulary x 768 output projection; the
    # token and position embedding lookups cost no matmul (nanoGPT/PaLM MFU accounting)
    model = build_model(ModelConfig(preset="gpt2-124m", max_seq_len=1024), 50257)
    blocks = sum(p.numel() for p in model.transformer.h.parameters()) + sum(p.numel() for p in model.transformer.ln_f.parameters())
    assert model.config.vocab_size == 50304  # padded to a multiple of 64: the matmul has 50,304 rows
    expected = 6 * (blocks + 50304 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(model, 1024) == expected
    assert 0.85e9 < expected < 0.88e9  # about 0.87 GFLOP per token at 1,024 positions
    # BERT-style: its word, position and token-type lookups cost no matmul; the MLM decoder is
    # tied to the word embedding and counted
    bert = build_model(tiny(objective="masked"), VOCAB, pad_id=1)
    emb = bert.bert.embeddings
    lookups = sum(m.weight.numel() for m in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings))
    assert bert.get_output_embeddings().weight is emb.word_embeddings.weight
    assert flops_per_token(bert, 64) == 6 * (num_params(bert) - lookups + emb.word_embeddings.weight.numel()) \
        + 12 * bert.config.num_hidden_layers * bert.config.hidden_size * 64


@pytest.mark.parametrize("kwargs, key", [
    (dict(preset="tiny", n_embd=65), "model.n_embd"),
    (dict(preset="custom"), "model.preset custom"),
    (dict(preset="tiny", n_layer=0), "model.n_layer"),  # a 0 is not "the preset's"
    (dict(preset="tiny", n_head=0), "model.n_head"),
    (dict(arch="llama", n_kv_head=0), "model.n_kv_head"),
    (dict(arch="llama", objective="masked"), "model.arch llama has no masked form"),  # not silently a BERT
    (dict(n_kv_head=2), "model.n_kv_head .* not to model.arch gpt2"),
    (dict(objective="masked", n_kv_head=2), "model.n_kv_head .* not to a masked BERT encoder"),
    (dict(max_seq_len=1), "model.max_seq_len"),
    (dict(dropout=1.5), "model.dropout"),
    (dict(pad_vocab_multiple=0), "model.pad_vocab_multiple"),
])
def test_model_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig(**kwargs)


def test_mask_tokens_80_10_10():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 1000, (200, 256), generator=g)
    x[:, 0] = 2  # a special token: never selected
    inputs, labels = mask_tokens(x, mask_id=3, vocab_size=1000, special_ids=[2], generator=g)
    selected = labels != -100
    assert not selected[:, 0].any()
    frac = selected.float().mean().item() * 256 / 255
    assert 0.14 < frac < 0.16
    masked = (inputs == 3) & selected
    kept = (inputs == x) & selected
    assert 0.77 < masked.sum() / selected.sum() < 0.83
    assert 0.08 < kept.sum() / selected.sum() < 0.13  # 10% kept plus random draws equal to the original
    assert torch.equal(labels[selected], x[selected]) and torch.equal(inputs[~selected], x[~selected])


def test_masked_lm_trains():
    model = build_model(tiny(objective="masked"), VOCAB, pad_id=1, seed=0)
    trainer = Trainer(model, OptimConfig(lr=3e-3, warmup_steps=2), LoopConfig(max_steps=100), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = fixed_batch(2, rows=8)
    losses = []
    for step in range(40):
        inputs, labels = mask_tokens(x, 3, VOCAB, [0, 1, 2], generator=g)
        losses.append(trainer.train_step([{"input_ids": inputs, "labels": labels}], step)[0])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def test_resume_is_exact(tmp_path):
    """3 steps + checkpoint + 3 steps in a new trainer == 6 steps straight."""
    from pipeline.train.checkpoint import load_training_state

    data = [fixed_batch(i) for i in range(4)]

    def batches(epoch):
        for x in data:
            yield {"input_ids": x, "labels": x}

    def make():
        model = build_model(tiny(dropout=0.1), VOCAB, seed=0)
        return Trainer(model, OptimConfig(lr=3e-3, warmup_steps=2), LoopConfig(max_steps=6, eval_every=100, log_every=1),
                       torch.device("cpu"))

    torch.manual_seed(0)
    straight = make()
    straight.fit(TrainState(), batches)

    torch.manual_seed(0)
    first = make()
    first.cfg = LoopConfig(max_steps=6, eval_every=100, log_every=1)
    state = TrainState()
    saved = {}

    def on_log(rec):
        if rec["step"] == 3 and not saved:
            save_checkpoint(tmp_path, first.model, optimizer=first.optimizer, state=state)
            saved["done"] = True
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.fit(state, batches, on_log=on_log)
    second = make()
    load_model_weights(second.model, tmp_path)
    resumed, _ = load_training_state(tmp_path, second.optimizer)
    assert resumed.step == 3 and resumed.epoch == 0 and resumed.batches_in_epoch == 3
    second.fit(resumed, batches)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_masked_run_resumed_in_a_later_epoch_draws_the_uninterrupted_runs_masks(tmp_path):
    """The masks of (rank, epoch) come from a generator of their own: a masked-LM run stopped in
    its second epoch and resumed by a fresh batcher ends with the uninterrupted run's weights (one
    generator for the whole run, restarted on resume, drew other masks there); ranks and epochs
    draw different masks."""
    from pipeline.train.checkpoint import load_training_state
    from pipeline.train.data import LMBatcher

    data = [fixed_batch(i) for i in range(3)]

    def run(interrupt_at=None, resume_from=None):
        batcher = LMBatcher("masked", mask_id=3, vocab_size=VOCAB, special_ids=[0, 1, 2], seed=7)
        model = build_model(tiny(objective="masked"), VOCAB, pad_id=1, seed=0)
        trainer = Trainer(model, OptimConfig(lr=3e-3, warmup_steps=2), LoopConfig(max_steps=8, eval_every=100, log_every=1),
                          torch.device("cpu"))
        state = TrainState()
        if resume_from:
            load_model_weights(model, resume_from)
            state, _ = load_training_state(resume_from, trainer.optimizer)

        def on_log(rec):
            if rec["step"] == interrupt_at:
                save_checkpoint(tmp_path, model, optimizer=trainer.optimizer, state=state)
                raise KeyboardInterrupt

        try:
            trainer.fit(state, lambda epoch: (batcher.for_epoch(epoch)(x) for x in data), on_log=on_log)
        except KeyboardInterrupt:
            return None
        return model

    torch.manual_seed(0)
    straight = run()
    torch.manual_seed(0)
    assert run(interrupt_at=5) is None
    resumed = run(resume_from=tmp_path)
    assert load_training_state(tmp_path, None)[0].epoch == 1
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    batcher = LMBatcher("masked", mask_id=3, vocab_size=VOCAB, special_ids=[0, 1, 2], seed=7)
    draws = {key: batcher.for_epoch(*key)(data[0])["labels"] for key in [(0, 0), (0, 1), (1, 0), (None, 0)]}
    assert torch.equal(draws[(0, 0)], batcher.for_epoch(0, 0)(data[0])["labels"])  # a function of the key alone
    assert len({tuple(v.flatten().tolist()) for v in draws.values()}) == 4
    causal = LMBatcher("causal")
    assert causal.for_epoch(3, 1) is causal  # draws nothing


def test_each_worker_resumes_its_own_random_streams(tmp_path, caplog):
    """A checkpoint holds every worker's generators: worker r resumes its own (dropout differs by
    rank); with another number of workers, rank 0 takes the saver's and the others keep their own
    seeding rather than all drawing rank 0's numbers, and rank 0 warns that the data position is
    not exact."""
    from pipeline.train.checkpoint import load_training_state, rng_state

    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(rng_state())
    model = build_model(tiny(), VOCAB, seed=0)
    torch.manual_seed(100)  # the saving process is rank 0
    save_checkpoint(tmp_path, model, state=TrainState(step=4), rng_by_rank=states)

    def next_draw(rank, world):
        torch.manual_seed(7)
        load_training_state(tmp_path, rank=rank, world_size=world)
        return torch.rand(3)

    expected = []
    for rank in range(2):
        torch.set_rng_state(states[rank]["torch"])
        expected.append(torch.rand(3))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert torch.equal(next_draw(0, 2), expected[0]) and torch.equal(next_draw(1, 2), expected[1])
    assert not caplog.records  # the same number of workers continues exactly
    assert not torch.equal(expected[0], expected[1])
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert torch.equal(next_draw(0, 3), expected[0])  # another world size: rank 0 takes the saver's
    assert [r.getMessage() for r in caplog.records if "saved by a run of 2 workers and this run has 3" in r.getMessage()
            and "scaling.num_workers=2" in r.getMessage()]
    torch.manual_seed(7)
    own = torch.rand(3)
    assert torch.equal(next_draw(1, 3), own)  # and rank 1 keeps its own seeding


def test_checkpoint_kinds_of_lms_and_classifiers_from_either_objective(tmp_path):
    """A classifier fine-tuned from a BERT-style base is a classifier (evaluated, compressed and
    served as one), not a masked LM; each kind is refused where another is needed, by name."""
    import transformers

    from pipeline.model.build import checkpoint_kind, require_causal, require_classifier

    kinds = {}
    for objective in ("causal", "masked"):
        lm = build_model(ModelConfig(preset="tiny", objective=objective, max_seq_len=32), 300, 1)
        lm.save_pretrained(tmp_path / objective)
        transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / objective, num_labels=2).save_pretrained(tmp_path / f"{objective}-clf")
        kinds[objective] = checkpoint_kind(tmp_path / objective)
        kinds[f"{objective}-clf"] = checkpoint_kind(tmp_path / f"{objective}-clf")
    assert kinds == {"causal": "causal", "masked": "masked", "causal-clf": "classifier", "masked-clf": "classifier"}
    require_causal(tmp_path / "causal", "m", "this")
    for name in ("causal-clf", "masked-clf"):
        require_classifier(tmp_path / name, "m")
        with pytest.raises(ValueError, match="m: .* is a sequence classifier; this needs a causal LM"):
            require_causal(tmp_path / name, "m", "this")
    with pytest.raises(ValueError, match="masked .*this needs a causal LM"):
        require_causal(tmp_path / "masked", "m", "this")
    for name in ("causal", "masked"):
        with pytest.raises(ValueError, match=f"is a {name} language model, not a sequence classifier"):
            require_classifier(tmp_path / name, "m")


def test_quiet_loading_silences_transformers_progress_bars(tmp_path, capfd):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pipeline.model.build import quiet_loading

    save_checkpoint(tmp_path, build_model(tiny(), VOCAB, seed=0))
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        capfd.readouterr()
        AutoModelForCausalLM.from_pretrained(tmp_path)
        assert "Loading weights" in capfd.readouterr().err  # what every worker, actor and replica printed
        quiet_loading()
        AutoModelForCausalLM.from_pretrained(tmp_path).save_pretrained(tmp_path / "again")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_a_rerun_resumes_from_the_latest_complete_checkpoint(tmp_path, caplog):
    """Ray copies a checkpoint into storage file by file with no final rename: a job killed during
    the copy leaves a directory with files missing or cut short. The rerun takes the one before."""
    import shutil

    from pipeline.train.checkpoint import incomplete, latest_checkpoint

    model = build_model(tiny(), VOCAB, seed=0)
    trainer = Trainer(model, OptimConfig(), LoopConfig(max_steps=10), torch.device("cpu"))
    for step, name in ((2, "checkpoint_a"), (4, "checkpoint_b")):
        save_checkpoint(tmp_path / name, model, optimizer=trainer.optimizer, state=TrainState(step=step))
    newest, older = tmp_path / "checkpoint_b", tmp_path / "checkpoint_a"
    assert latest_checkpoint(tmp_path) == newest and incomplete(newest) is None
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)

    def damaged(name: str, keep: float) -> Path:
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        data = (newest / name).read_bytes()
        if keep:
            (newest / name).write_bytes(data[:int(len(data) * keep)])
        else:
            (newest / name).unlink()
        return latest_checkpoint(tmp_path)

    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert damaged("model.safetensors", 0.9) == older
        assert "model.safetensors: cut short" in caplog.text and "step 4" in caplog.text
        assert damaged("model.safetensors", 0.0001) == older  # not even the whole header
        assert damaged("model.safetensors", 0) == older
        assert damaged("training_state.pt", 0.9) == older
        assert "training_state.pt missing or cut short" in caplog.text
        assert damaged("config.json", 0.5) == older
        assert damaged("trainer_state.json", 0.5) == older  # not even its step is known
    shutil.rmtree(newest)
    shutil.copytree(pristine, newest)
    assert latest_checkpoint(tmp_path) == newest
    shutil.rmtree(older)
    assert damaged("training_state.pt", 0) is None  # nothing complete: the run starts afresh


def test_a_compiled_model_trains_and_saves_a_plain_checkpoint(tmp_path):
    """``train.compile``: the worker trains ``torch.compile(model)``; its losses are the eager
    model's, and its checkpoint has the plain parameter names (no ``_orig_mod.``), loading into an
    uncompiled model with the same logits."""
    from transformers import AutoModelForCausalLM

    x = fixed_batch()
    losses = {}
    for compiled in (False, True):
        model = build_model(tiny(), VOCAB, seed=0)
        run = torch.compile(model) if compiled else model
        trainer = Trainer(run, OptimConfig(lr=3e-3, warmup_steps=0), LoopConfig(max_steps=10), torch.device("cpu"))
        losses[compiled] = [trainer.train_step([{"input_ids": x, "labels": x}], step)[0] for step in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    save_checkpoint(tmp_path, run, optimizer=trainer.optimizer, state=TrainState(step=3))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-6)


def test_the_context_length_of_a_roberta_style_model_is_the_tokens_it_reads():
    """RoBERTa-style models number positions from padding_idx + 1: roberta-base's 514 rows read
    512 tokens. The limit is what a forward pass takes, one more token fails; GPT-2's and BERT's
    tables are read whole."""
    import transformers

    from pipeline.model.build import context_length

    for config_cls, model_cls in ((transformers.RobertaConfig, transformers.RobertaForMaskedLM),
                                  (transformers.MPNetConfig, transformers.MPNetForMaskedLM)):
        config = config_cls(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=24, pad_token_id=3)
        limit = context_length(config)
        assert limit == 24 - (3 if config.model_type == "roberta" else 1) - 1  # MPNet pads with id 1, always
        model = model_cls(config).eval()
        model(input_ids=torch.full((1, limit), 7))
        with pytest.raises(Exception):
            model(input_ids=torch.full((1, limit + 1), 7))
    assert context_length(transformers.BertConfig(max_position_embeddings=24, pad_token_id=3)) == 24
    assert context_length(transformers.GPT2Config(n_positions=24)) == 24
    assert context_length(transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # roberta-base
    with pytest.raises(ValueError, match="leaves no position after its padding id 30"):
        context_length(transformers.RobertaConfig(max_position_embeddings=24, pad_token_id=30))
