"""Pruning and int8 quantization on tiny GPT-2 and Llama models, and the compress job's table."""

from __future__ import annotations

import pytest
import torch
import transformers

from pipeline.compress.prune import magnitude_prune, structured_prune
from pipeline.compress.quantize import file_size, load_model, quantize_int8, save_int8
from pipeline.config import from_dict, to_dict
from pipeline.model.build import ModelConfig, build_model


@pytest.fixture(scope="module")
def tok(tiny_prepared):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_prepared[0] / "tokenizer"))


def saved(tok, tmp_path, arch="gpt2", name="m"):
    model = build_model(ModelConfig(arch=arch, preset="tiny", max_seq_len=64), len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name


def ids(tok):
    return torch.tensor([tok("the market rose today")["input_ids"]])


def test_magnitude_pruning_zeroes_the_requested_share(tok, tmp_path):
    model = load_model(saved(tok, tmp_path))
    info = magnitude_prune(model, 0.6)
    assert info["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert not any("weight_orig" in n for n, _ in model.named_parameters())  # masks made permanent
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(model, 1.5)


@pytest.mark.parametrize("arch,heads", [("gpt2", 1.0), ("llama", 0.5)])
def test_structured_pruning_is_smaller_and_reloads(tok, tmp_path, arch, heads):
    src = saved(tok, tmp_path, arch)
    base = load_model(src)
    model = load_model(src)
    info = structured_prune(model, mlp_keep=0.5, heads_keep=heads)
    logits = model(ids(tok)).logits
    model.save_pretrained(tmp_path / "pruned")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # the stock class loads it
    assert torch.allclose(back(ids(tok)).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in base.parameters())
    assert file_size(tmp_path / "pruned") < file_size(src)
    assert "mlp_neurons" in info and (heads == 1.0 or "attention_heads" in info)


def _other_family(tok, kind):
    small = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                 num_attention_heads=4, max_position_embeddings=64)
    cfg = {"qwen2": lambda: transformers.Qwen2Config(**small, num_key_value_heads=2),  # biased q/k/v
           "mistral": lambda: transformers.MistralConfig(**small, num_key_value_heads=2),
           "opt": lambda: transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                 num_attention_heads=4, word_embed_proj_dim=32)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_structured_pruning_of_models_with_llamas_layout(tok, tmp_path, kind):
    model = _other_family(tok, kind)
    before = sum(p.numel() for p in model.parameters())
    info = structured_prune(model, mlp_keep=0.5, heads_keep=0.5)
    assert info["mlp_neurons"] == "64 -> 32" and info["attention_heads"] == "4 -> 2"
    with torch.no_grad():
        logits = model(ids(tok)).logits
    model.save_pretrained(tmp_path / kind)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    with torch.no_grad():
        assert torch.allclose(back(ids(tok)).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in back.parameters()) < before


def test_structured_pruning_of_other_layouts_is_refused_with_the_alternatives(tok):
    with pytest.raises(ValueError, match="'opt'.*magnitude or int8"):
        structured_prune(_other_family(tok, "opt"), mlp_keep=0.5)


def test_structured_pruning_of_bert_style_models_and_their_classifiers(tok, tmp_path):
    """The masked objective's BERT and a classifier fine-tuned from it lose MLP neurons and reload
    with the stock classes; their heads cannot be removed (head size = width / heads)."""
    mlm = build_model(ModelConfig(preset="tiny", objective="masked", max_seq_len=64), len(tok), tok.pad_token_id)
    mlm.save_pretrained(tmp_path / "mlm")
    torch.manual_seed(0)
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=3)
    for name, model, auto in (("mlm", mlm, transformers.AutoModelForMaskedLM),
                              ("clf", clf, transformers.AutoModelForSequenceClassification)):
        model.eval()
        before = sum(p.numel() for p in model.parameters())
        inner = model.config.intermediate_size
        with pytest.raises(ValueError, match="heads cannot be removed"):
            structured_prune(model, mlp_keep=0.5, heads_keep=0.5)
        assert structured_prune(model, mlp_keep=0.5) == {"mlp_neurons": f"{inner} -> {inner // 2}"}
        with torch.no_grad():
            logits = model(ids(tok)).logits
        model.save_pretrained(tmp_path / f"{name}-pruned")
        back = auto.from_pretrained(tmp_path / f"{name}-pruned").eval()
        with torch.no_grad():
            assert torch.allclose(back(ids(tok)).logits, logits, atol=1e-5)
        assert sum(p.numel() for p in back.parameters()) < before


def test_gpt2_head_pruning_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="head"):
        structured_prune(load_model(saved(tok, tmp_path)), heads_keep=0.5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_round_trip_and_close_to_fp32(tok, tmp_path, arch):
    src = saved(tok, tmp_path, arch)
    fp32 = load_model(src)(ids(tok)).logits
    q = quantize_int8(load_model(src))
    out = q(ids(tok)).logits
    save_int8(q, tok, tmp_path / "q", source=str(src))
    again = load_model(tmp_path / "q")(ids(tok)).logits
    assert torch.equal(again, out)  # the stored int8 values are exactly what was quantized
    assert (out - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert file_size(tmp_path / "q") < file_size(src)


def _calibration(tok, n=6):
    texts = ["the market rose today", "shares fell after the report", "the team won the final match",
             "a new phone was sold", "the minister said on monday", "the film won an award"]
    return [{"input_ids": torch.tensor([tok(t)["input_ids"]])} for t in texts[:n]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_calibrated_int8_is_batch_and_cache_invariant_and_round_trips(tok, tmp_path, arch):
    """Fixed activation scales: a row's tokens do not depend on its batch or on the KV cache (the
    dynamic per-call scale breaks both), and the scales survive save and load."""
    import json

    from pipeline.compress.quantize import Int8Linear
    from pipeline.serve.engine import Engine, SamplingParams

    src = saved(tok, tmp_path, arch)
    fp32 = load_model(src)
    with torch.no_grad():  # a random tiny model's activations are tiny: widen their range so
        for p in fp32.parameters():  # that per-call scales of different batches really differ
            p.mul_(3.0) if p.dim() == 2 else None
    q = quantize_int8(fp32, _calibration(tok))
    wrapped = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert wrapped and all(m.input_scale > 0 for m in wrapped)
    save_int8(q, tok, tmp_path / "q", source=str(src))
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["activations"].startswith("static")
    back = load_model(tmp_path / "q")
    assert [m.input_scale for m in back.modules() if isinstance(m, Int8Linear)] == [m.input_scale for m in wrapped]
    assert torch.equal(back(ids(tok)).logits, q(ids(tok)).logits)
    engine = Engine(back, tok, max_batch_size=8)
    prompts = ["the market", "a long sport story about the final", "news", "shares rose in the morning trade"]
    reqs = [(engine.encode(p), SamplingParams(max_tokens=16, temperature=0)) for p in prompts]
    batched = [g.token_ids for g in engine.generate(reqs)]
    assert batched == [engine.generate([r])[0].token_ids for r in reqs]
    assert batched == [g.token_ids for g in engine.generate(reqs, use_cache=False)]


def test_calibration_needs_data_that_reaches_the_model(tok, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(load_model(saved(tok, tmp_path)), [])


def test_int8_loader_rejects_mismatched_weights(tok, tmp_path):
    src = saved(tok, tmp_path)
    save_int8(quantize_int8(load_model(src)), tok, tmp_path / "q", source=str(src))
    cfg = (tmp_path / "q" / "config.json")
    cfg.write_text(cfg.read_text().replace('"n_layer": 2', '"n_layer": 3'))
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "q")


def test_compress_job_table(tok, tmp_path, tiny_prepared):
    from pipeline.compress.run import CompressConfig, run_compress

    src = saved(tok, tmp_path)
    cfg = from_dict(CompressConfig, {
        "output_dir": str(tmp_path / "out"), "models": [{"name": "lm", "path": str(src)}],
        "variants": [{"name": "mag", "method": "magnitude", "sparsity": 0.5},
                     {"name": "mlp", "method": "structured", "mlp_keep": 0.5}, {"name": "int8", "method": "int8"}],
        "eval": {"lm_data": str(tiny_prepared[0]), "lm_rows": 8, "decode_tokens": 8, "repeats": 1, "max_len": 32},
    })
    res = run_compress(cfg)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"base", "mag", "mlp", "int8"}
    assert rows["mlp"]["parameters"] < rows["base"]["parameters"] and rows["mlp"]["file_bytes"] < rows["base"]["file_bytes"]
    assert rows["mag"]["nonzero_parameters"] < rows["base"]["nonzero_parameters"]
    assert rows["int8"]["file_bytes"] < rows["base"]["file_bytes"]
    assert all(r["val_perplexity"] > 1 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert "| lm | int8 |" in (tmp_path / "out").glob("*/results.md").__next__().read_text()
    with pytest.raises(ValueError, match="variants"):
        from_dict(CompressConfig, {"models": [{"name": "lm", "path": "x"}], "variants": [{"name": "v", "method": "zip"}]})
    assert rows["int8"]["activations"] == "calibrated"
    with pytest.raises(ValueError, match="calibration_rows"):
        from_dict(CompressConfig, {"models": [{"name": "lm", "path": "x"}],
                                   "variants": [{"name": "v", "method": "int8", "calibration_rows": -1}]})


def test_int8_calibration_without_training_data_names_the_key(tok, tmp_path):
    from pipeline.compress.run import CompressEvalConfig, VariantSpec, make_variant

    with pytest.raises(ValueError, match=r"variants\[int8\]\.calibration_rows"):
        make_variant(saved(tok, tmp_path), "causal", VariantSpec(name="int8", method="int8"), tmp_path / "q",
                     CompressEvalConfig())
    info = make_variant(saved(tok, tmp_path), "causal", VariantSpec(name="int8", method="int8", calibration_rows=0),
                        tmp_path / "q", CompressEvalConfig())
    assert info["activations"] == "dynamic"


def test_compress_job_refuses_inapplicable_variants_before_any_work(tok, tmp_path):
    from pipeline.compress.run import CompressConfig, CompressEvalConfig, VariantSpec, make_variant, run_compress

    opt = _other_family(tok, "opt")
    opt.save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    make_variant(saved(tok, tmp_path), "causal", VariantSpec(name="q", method="int8", calibration_rows=0),
                 tmp_path / "q", CompressEvalConfig())

    def job(path, variants):
        return from_dict(CompressConfig, {"output_dir": str(tmp_path / "out"), "models": [{"name": "lm", "path": str(path)}],
                                          "variants": variants, "eval": {"lm_rows": 0}})

    with pytest.raises(ValueError, match=r"variants\[mlp\] on models\[lm\].*'opt'"):
        run_compress(job(tmp_path / "opt", [{"name": "mag", "method": "magnitude"},
                                            {"name": "mlp", "method": "structured", "mlp_keep": 0.5}]))
    with pytest.raises(ValueError, match=r"models\[lm\].*int8 model"):
        run_compress(job(tmp_path / "q", [{"name": "mag", "method": "magnitude"}]))
    as_classifier = job(tmp_path / "opt", [{"name": "mag", "method": "magnitude"}])
    as_classifier = from_dict(CompressConfig, {**to_dict(as_classifier),
                                               "models": [{"name": "lm", "path": str(tmp_path / "opt"), "kind": "classifier"}]})
    with pytest.raises(ValueError, match=r"models\[lm\].*causal language model, not a sequence classifier"):
        run_compress(as_classifier)
    assert not (tmp_path / "out").exists()  # refused before any output


def test_int8_stores_the_token_embedding_as_int8(tok, tmp_path):
    """Tied to the LM head, the embedding is the head's int8 rows and is stored once; a classifier's
    own embedding is stored as int8 rows; both load to the logits they had before saving. A
    directory written before (fp32 embedding, no marker entry) still loads."""
    import json

    from safetensors.torch import load_file, save_file

    from pipeline.compress.quantize import WEIGHTS

    src = saved(tok, tmp_path)
    q = quantize_int8(load_model(src), _calibration(tok))
    save_int8(q, tok, tmp_path / "q", source=str(src))
    stored = load_file(str(tmp_path / "q" / WEIGHTS))
    assert "transformer.wte.weight" not in stored and "transformer.wte.weight.qweight" not in stored
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["embedding"].startswith("int8 rows")
    back = load_model(tmp_path / "q")
    head_rows = back.lm_head.inner.weight().dequantize()
    assert torch.equal(back.transformer.wte.weight, head_rows)
    assert torch.equal(back(ids(tok)).logits, q(ids(tok)).logits)

    cls = transformers.GPT2ForSequenceClassification(load_model(src).config)
    cls.config.pad_token_id = tok.pad_token_id
    cls.save_pretrained(tmp_path / "cls")
    qc = quantize_int8(load_model(tmp_path / "cls", "classifier"), _calibration(tok))
    save_int8(qc, tok, tmp_path / "qc", source="cls")
    stored = load_file(str(tmp_path / "qc" / WEIGHTS))
    assert stored["transformer.wte.weight.qweight"].dtype == torch.int8
    assert torch.equal(load_model(tmp_path / "qc", "classifier")(ids(tok)).logits, qc(ids(tok)).logits)

    # the earlier format: the embedding in fp32, no "embedding" entry in the marker
    stored = load_file(str(tmp_path / "qc" / WEIGHTS))
    q8, scales = stored.pop("transformer.wte.weight.qweight"), stored.pop("transformer.wte.weight.scales")
    stored["transformer.wte.weight"] = q8.float() * scales[:, None]
    save_file(stored, str(tmp_path / "qc" / WEIGHTS))
    marker = json.loads((tmp_path / "qc" / "quantization.json").read_text())
    del marker["embedding"]
    (tmp_path / "qc" / "quantization.json").write_text(json.dumps(marker))
    assert torch.equal(load_model(tmp_path / "qc", "classifier")(ids(tok)).logits, qc(ids(tok)).logits)


def test_scored_and_calibration_rows_are_a_seeded_sample_of_the_whole_split(tiny_prepared, tmp_path):
    """Labeled files often come sorted by label: the rows the compress job scores (and calibrates
    int8 on) are a seeded random sample of the split, not its first rows."""
    import json
    from dataclasses import replace

    import pyarrow.parquet as pq

    from pipeline.compress.run import CompressEvalConfig, _cls_rows, _lm_rows
    from pipeline.train.data import load_manifest, shard_paths

    rows = [{"content": f"text number {i}", "topic": "ab"[i >= 50]} for i in range(100)]
    (tmp_path / "sorted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = CompressEvalConfig(classify_data=str(tmp_path / "sorted.jsonl"), classify_rows=10, text_field="content",
                           label_field="topic")
    got = _cls_rows(e)
    assert len(got) == 10 and {r["label"] for r in got} == {"a", "b"} and got == _cls_rows(e)
    assert [r["idx"] for r in got] == sorted(r["idx"] for r in got)
    assert all(r["text"] == f"text number {r['idx']}" for r in got)
    assert _cls_rows(replace(e, seed=1)) != got and len(_cls_rows(replace(e, classify_rows=0))) == 100

    prep = tiny_prepared[0]
    files = shard_paths(prep, load_manifest(prep), "train")
    every = [r for f in files for r in pq.read_table(f).column("input_ids").to_pylist()]
    assert len(files) > 1 and len(every) > 12
    lm = _lm_rows(CompressEvalConfig(lm_data=str(prep), lm_rows=12, max_len=16), "train")
    assert len(lm) == 12 and lm == _lm_rows(CompressEvalConfig(lm_data=str(prep), lm_rows=12, max_len=16), "train")
    positions = [next(i for i, r in enumerate(every) if r[:16] == x) for x in lm]
    assert positions == sorted(positions) and positions[-1] >= len(every) // 2  # not just the first shard's rows


def test_int8_calibration_data_is_checked_before_any_work(tok, tmp_path):
    """An int8 variant calibrates on a train split: a classifier scored on a single labeled file
    needs ``eval.classify_train_data``, a causal LM needs ``eval.lm_data`` with train shards; both
    are refused by name before any model is touched, and ``calibration_rows: 0`` needs neither."""
    import json

    from pipeline.compress.run import CompressConfig, check_compress

    lm = saved(tok, tmp_path)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2,
                                     pad_token_id=tok.pad_token_id)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(6)))

    def job(models, eval_, rows=64):
        return from_dict(CompressConfig, {"output_dir": str(tmp_path / "out"), "models": models, "eval": eval_,
                                          "variants": [{"name": "q", "method": "int8", "calibration_rows": rows}]})

    cls = [{"name": "c", "path": str(tmp_path / "cls"), "kind": "classifier"}]
    with pytest.raises(ValueError, match="classify_data .*test.jsonl has none; set eval.classify_train_data"):
        check_compress(job(cls, {"classify_data": str(tmp_path / "test.jsonl")}))
    check_compress(job(cls, {"classify_data": str(tmp_path / "test.jsonl"), "classify_train_data": str(tmp_path / "test.jsonl")}))
    check_compress(job(cls, {"classify_data": str(tmp_path / "test.jsonl")}, rows=0))
    with pytest.raises(ValueError, match="causal LM reads train rows of eval.lm_data: set it"):
        check_compress(job([{"name": "lm", "path": str(lm)}], {}))
    with pytest.raises(ValueError, match=f"eval.lm_data: {tmp_path} is not a finished prepare output"):
        check_compress(job([{"name": "lm", "path": str(lm)}], {"lm_data": str(tmp_path)}))
    (tmp_path / "hub").mkdir()  # a Hub-layout directory: its train and test files would be scored as one set
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "hub" / name).write_text((tmp_path / "test.jsonl").read_text())
    with pytest.raises(ValueError, match="eval.classify_data: .*hub holds files named for several splits"):
        check_compress(job(cls, {"classify_data": str(tmp_path / "hub"), "classify_train_data": str(tmp_path / "test.jsonl")}))
