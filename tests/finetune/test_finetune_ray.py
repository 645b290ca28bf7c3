"""Fine-tuning and evaluation end to end on Ray (tiny models): a labeled prepare output -> tiny
pretrain -> classifier and SFT fine-tunes -> the evaluate job's four sections."""

from __future__ import annotations

import json
import math
import random

import pytest

from pipeline.config import from_dict
from pipeline.data.prepare import PrepareConfig, run_prepare
from pipeline.evaluate.run import EvaluateConfig, run_evaluate
from pipeline.finetune.finetune import FinetuneConfig, run_finetune
from pipeline.train.pretrain import PretrainConfig, run_pretrain
from tests.helpers import write_jsonl

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(900)]

TOPICS = {"sport": "match goal team player coach league score win season stadium".split(),
          "money": "market shares profit bank price investor trade growth company economy".split()}
FILLER = "the of and to with for on that this from".split()


def labeled_doc(rng: random.Random, topic: str) -> str:
    sentences = []
    for _ in range(8):
        words = [rng.choice(TOPICS[topic]) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(9)]
        sentences.append(" ".join(words).capitalize() + f" {rng.randrange(10**6)}.")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    rng = random.Random(3)
    root = tmp_path_factory.mktemp("labeled")
    rows = [{"text": labeled_doc(rng, t), "topic": t} for t in ["sport", "money"] * 100]
    (root / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("pipe")
    prep = from_dict(PrepareConfig, {
        "name": "lab", "output_dir": str(out / "prep"), "sources": [{"path": str(root / "news.jsonl"), "label_field": "topic"}],
        "quality": {"gopher_repetition": {"enabled": False}, "fineweb": {"enabled": False}},
        "language": {"enabled": False}, "tokenizer": {"vocab_size": 300}, "pack": {"seq_len": 32},
        "split": {"val_fraction": 0.15, "test_fraction": 0.2},
    })
    run_prepare(prep)
    scaling = {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1}
    pre = from_dict(PretrainConfig, {
        "data": str(prep.run_dir), "output_dir": str(out / "pre"), "model": {"preset": "tiny", "max_seq_len": 64},
        "train": {"max_steps": 10, "batch_size": 4, "eval_every": 10, "eval_batches": 2}, "scaling": scaling,
    })
    pre_summary = run_pretrain(pre)
    return {"prep": prep, "pre": pre_summary, "out": out, "scaling": scaling, "chat_root": root}


def test_classifier_finetune_and_evaluate(pipeline_dirs):
    """Trained article by article (every text read as up to 4 windows of 32 tokens, the loss on the
    mean of their probabilities, plus an auxiliary next-token loss) on two workers; evaluated
    reading the texts the same way."""
    d = pipeline_dirs
    cls = from_dict(FinetuneConfig, {
        "task": "classification", "base_model": d["pre"]["model_dir"], "output_dir": str(d["out"] / "ft"),
        "data": {"train": str(d["prep"].run_dir), "max_seq_len": 32, "windows": 4, "window_overlap": 8,
                 "window_training": "article"},
        "aux_lm_weight": 0.5, "aux_lm_share": 0.5,  # the auxiliary next-token loss, through DDP
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 30, "batch_size": 8, "eval_every": 15, "eval_batches": 0}, "scaling": d["scaling"],
    })
    summary = run_finetune(cls)
    assert summary["task"] == "classification" and set(summary["label2id"]) == {"money", "sport"}
    assert summary["examples"]["train"] > 50 and "test" in summary["examples"]
    # the exported checkpoint is the one with the best validation accuracy, and its tokenizer ends
    # every text with EOS, where the classifier reads it
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    evals = [json.loads(l) for l in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
             if '"eval"' in l]
    assert summary["exported"]["val_accuracy"] == max(e["val_accuracy"] for e in evals)
    # filler rows make the splits divide among the workers: every validation row is scored
    shares, workers = summary["equal_shares"], d["scaling"]["num_workers"]
    assert {s: v["rows"] for s, v in shares.items()} == {s: summary["examples"][s] for s in ("train", "val")}
    assert all(e["val_tokens"] == shares["val"]["rows"] for e in evals), evals
    for share in shares.values():
        assert share["per_worker"] * workers == share["rows"] + share["filler_rows"] and share["filler_rows"] < workers
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    assert tok("shares rose")["input_ids"][-1] == tok.eos_token_id
    ev = from_dict(EvaluateConfig, {
        "output_dir": str(d["out"] / "eval"),
        "lm": {"model": d["pre"]["model_dir"], "data": str(d["prep"].run_dir)},
        "classification": {"model": summary["model_dir"], "data": str(d["prep"].run_dir), "group_field": "source"},
        "fewshot": {"model": d["pre"]["model_dir"], "data": str(d["prep"].run_dir), "k": 2, "max_queries": 10, "max_len": 64},
        "bias": {"model": d["pre"]["model_dir"]},
    })
    res = run_evaluate(ev)
    c = res["classification"]
    assert c["support"] == summary["examples"]["test"]
    assert c["accuracy"] > 0.8, c  # the topics are separable by vocabulary
    assert c["baseline_tfidf_logreg"]["accuracy"] > 0.9
    assert c["baseline_tfidf_logreg_same_reading"]["reading"] == "4 windows of 32 tokens"
    assert c["baseline_tfidf_logreg_same_reading"]["support"] == c["support"]
    vs = c["classifier_vs_baseline"]  # the paired comparison counts the same examples
    assert 0 <= vs["only_a_correct"] + vs["only_b_correct"] <= c["support"] and 0 < vs["mcnemar_exact_p"] <= 1
    assert vs["f1_macro_diff"] == pytest.approx(c["f1_macro"] - c["baseline_tfidf_logreg"]["f1_macro"])
    assert c["sliced"]["per_group"].keys() == {"news"}
    assert res["lm"]["perplexity"] > 1 and res["lm"]["bits_per_byte"] > 0
    assert res["fewshot"]["support"] == 10 and res["bias"]["n"] >= 12
    out = res["output_dir"]
    for name in ("results.json", "report.md", "confusion_matrix.png", "bias_gaps.png"):
        assert (d["out"] / "eval").exists() and __import__("pathlib").Path(out, name).exists(), name

    # a labeled file sorted by label, its own column names, and a label the classifier never saw:
    # the few-shot queries are a seeded sample across the labels (the first 8 rows are all one
    # label), and the unseen label's rows count as errors, reported by name
    rng = random.Random(5)
    rows = [{"body": labeled_doc(rng, t), "y": t} for t in ["money"] * 12 + ["sport"] * 12]
    rows += [{"body": "Rain and strong wind are expected tomorrow.", "y": "weather"}] * 2 + [{"body": "No label."}]
    Path(d["out"], "sorted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = str(Path(d["out"], "sorted.jsonl"))
    full_lm = res["lm"]
    res = run_evaluate(from_dict(EvaluateConfig, {
        "output_dir": str(d["out"] / "eval2"), "bias": None,
        "lm": {"model": d["pre"]["model_dir"], "data": str(d["prep"].run_dir), "max_rows": 3},
        "classification": {"model": summary["model_dir"], "data": labeled, "text_field": "body", "label_field": "y",
                           "train_data": labeled, "group_field": "region"},
        "fewshot": {"model": d["pre"]["model_dir"], "data": labeled, "train_data": labeled, "text_field": "body",
                    "label_field": "y", "k": 3, "max_queries": 8, "max_len": 64},
    }))
    c = res["classification"]
    assert c["support"] == 26 and c["labels_unknown_to_model"] == ["weather"]
    assert "sliced" not in c and "no row of the test split has a field 'region'" in c["not_sliced"]
    assert c["per_label"]["weather"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert c["accuracy"] <= 24 / 26 and len(c["confusion_matrix"]) == 3
    # the unlabeled row is counted once per section, though the file is both the split and the train data
    assert c["rejected_rows"] == res["fewshot"]["rejected_rows"] == 1
    assert c["baseline_tfidf_logreg"]["train_rows"] == 26 and c["baseline_tfidf_logreg"]["train_rejected_rows"] == 0
    # a separate train file for the baseline: its own rejected rows are counted apart
    Path(d["out"], "train2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24] + [{"y": "money"}] * 2))
    c2 = run_evaluate(from_dict(EvaluateConfig, {
        "output_dir": str(d["out"] / "eval3"), "bias": None, "lm": None, "fewshot": None,
        "classification": {"model": summary["model_dir"], "data": labeled, "text_field": "body", "label_field": "y",
                           "train_data": str(Path(d["out"], "train2.jsonl")), "group_field": None}}))["classification"]
    assert (c2["rejected_rows"], c2["baseline_tfidf_logreg"]["train_rows"], c2["baseline_tfidf_logreg"]["train_rejected_rows"]) \
        == (1, 24, 2)
    supports = {y: v["support"] for y, v in res["fewshot"]["per_label"].items()}
    assert res["fewshot"]["queries"] == sum(supports.values()) == 8
    assert supports["money"] > 0 and supports["sport"] > 0, supports
    assert 0 < res["lm"]["tokens"] <= 3 * 64 < full_lm["tokens"]


def test_sft_finetune_masks_prompts_and_loads(pipeline_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = pipeline_dirs
    chat = tmp_path / "chat.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"What wins {w}?"}, {"role": "assistant", "content": f"The {w} team."}]}
             for w in TOPICS["sport"]] * 4
    chat.write_text("".join(json.dumps(c) + "\n" for c in convs) + "{broken\n")
    sft = from_dict(FinetuneConfig, {
        "task": "sft", "base_model": d["pre"]["model_dir"], "output_dir": str(d["out"] / "sft"),
        "data": {"train": str(chat), "max_seq_len": 32}, "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 10, "batch_size": 4, "eval_every": 5, "eval_batches": 0}, "scaling": d["scaling"],
        "run": {"checkpoint_metric": "last", "num_to_keep": 1},
    })
    summary = run_finetune(sft)
    assert summary["exported"]["step"] == summary["steps"] == 10  # "last": the final checkpoint, whatever its val loss
    assert summary["rejected"] == 1 and summary["examples"]["train"] + summary["examples"]["val"] == 40
    # a validation split smaller than a batch per worker (here 2 per worker, batch 4) is scored whole
    from pathlib import Path

    evals = [json.loads(l) for l in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert 0 < summary["examples"]["val"] < 2 * 4 and evals and all(e["val_tokens"] > 0 for e in evals), evals
    assert summary["best_val_loss"] == min(e["val_loss"] for e in evals) < 20
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    AutoModelForCausalLM.from_pretrained(summary["model_dir"])


def test_finetune_bad_inputs(pipeline_dirs, tmp_path):
    d = pipeline_dirs
    base = {"base_model": d["pre"]["model_dir"], "output_dir": str(tmp_path), "scaling": d["scaling"]}
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        run_finetune(from_dict(FinetuneConfig, {**base, "task": "sft", "base_model": str(tmp_path), "data": {"train": "chatterbot"}}))
    one_label = tmp_path / "one.jsonl"
    write_jsonl(one_label, ["a text"] * 5)
    with pytest.raises(ValueError, match="no column 'label'"):
        run_finetune(from_dict(FinetuneConfig, {**base, "task": "classification",
                                                "data": {"train": str(one_label), "max_seq_len": 64}}))
    with pytest.raises(ValueError, match=r"data\.max_seq_len \(256\) exceeds the base model's context length \(64\)"):
        run_finetune(from_dict(FinetuneConfig, {**base, "task": "classification", "data": {"train": str(one_label)}}))
    with pytest.raises(ValueError, match="task"):
        from_dict(FinetuneConfig, {**base, "task": "regression", "data": {"train": "x"}})
    chat, one = tmp_path / "chat.jsonl", tmp_path / "one_val.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"Who won {w}?", "completion": "The home team."}) + "\n"
                            for w in TOPICS["sport"]))
    one.write_text(json.dumps({"prompt": "Who won?", "completion": "Nobody."}) + "\n")
    # one example for two workers, in training and in validation: the other worker's share is a
    # filler row without loss; the example is trained on and scored
    tiny = run_finetune(from_dict(FinetuneConfig, {
        **base, "task": "sft", "train": {"max_steps": 2, "eval_every": 2, "batch_size": 2},
        "data": {"train": str(one), "val": str(one), "max_seq_len": 32}}))
    assert tiny["equal_shares"] == {s: {"rows": 1, "per_worker": 1, "filler_rows": 1} for s in ("train", "val")}
    assert tiny["steps"] == 2 and 0 < tiny["final"]["val_tokens"] < 32 and math.isfinite(tiny["final"]["val_loss"])
    assert tiny["final"]["train_loss"] > 0


def test_tune_sweeps_a_classification_finetune(pipeline_dirs, tmp_path):
    """Ray Tune over the fine-tuning function (the base YAML has a ``task``), ranked by validation
    accuracy; the best configuration is a finetune YAML the finetune job accepts unchanged."""
    import yaml

    from jobs import finetune
    from pipeline.tune.sweep import TuneConfig, run_tune

    d = pipeline_dirs
    base = tmp_path / "ft.yaml"
    base.write_text(yaml.safe_dump({
        "task": "classification", "base_model": d["pre"]["model_dir"], "output_dir": str(tmp_path / "unused"),
        "data": {"train": str(d["prep"].run_dir), "max_seq_len": 64},
        "train": {"batch_size": 8, "eval_batches": 0, "log_every": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.45, "threads_per_worker": 1},
    }))
    cfg = from_dict(TuneConfig, {"base": str(base), "output_dir": str(tmp_path / "tune"), "num_samples": 2,
                                 "max_steps": 6, "eval_every": 3, "metric": "val_accuracy", "seed": 0,
                                 "space": {"lr": [1e-5, 5e-3], "batch_size": [8], "weight_decay": [0.0],
                                           "warmup_steps": [1]}})
    summary = run_tune(cfg)
    import ray

    import time

    # no stopped trial's placement group keeps CPUs from what runs next (it once hung the next fit);
    # resources come back asynchronously, a leak never
    deadline = time.monotonic() + 45
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(ray.cluster_resources()["CPU"]), \
        ray.available_resources()
    trials = summary["trials"]
    assert summary["num_trials"] == 2 and not any(t["error"] for t in trials), trials
    assert all(0 <= t["val_accuracy"] <= 1 and t["val_loss"] > 0 for t in trials)
    assert summary["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    assert summary["best_config"].endswith("best_finetune.yaml")
    best = finetune.parse_config(["--config", summary["best_config"]])  # accepted unchanged
    assert best.task == "classification" and best.optim.lr == pytest.approx(summary["best"]["lr"])
    with pytest.raises(ValueError, match="space.n_layer"):
        run_tune(from_dict(TuneConfig, {**{"base": str(base), "output_dir": str(tmp_path / "t2")},
                                        "space": {"n_layer": [2]}}))
