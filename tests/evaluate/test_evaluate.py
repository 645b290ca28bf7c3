"""Evaluation cores: metrics equal scikit-learn's, perplexity / bits per byte, the few-shot scorer,
and a bias probe that detects a bias planted in a toy model."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.data.tokenizer import TokenizerConfig, train_tokenizer
from pipeline.evaluate.bias import counterfactual_probe, load_pairs, sliced_metrics
from pipeline.evaluate.classify import classification_metrics, paired_comparison, tfidf_baseline
from pipeline.evaluate.fewshot import build_prompt, draw_shots, fewshot_predict, option_logprobs
from pipeline.evaluate.lm import lm_metrics_from_rows, lm_metrics_from_texts
from pipeline.model.build import ModelConfig, build_model
from pipeline.train.loop import LoopConfig, OptimConfig, Trainer

torch.set_num_threads(1)


def test_classification_metrics_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    y_true = list("aabbbcccca")
    y_pred = list("abbbcccaab")
    labels = ["a", "b", "c"]
    m = classification_metrics(y_true, y_pred, labels)
    assert m["accuracy"] == accuracy_score(y_true, y_pred)
    for avg in ("macro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(y_true, y_pred, average=avg))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(y_true, y_pred, average=avg))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(y_true, y_pred, average=avg))
    from sklearn.metrics import confusion_matrix

    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["confusion_matrix"][0] == [1, 2, 0]  # true "a": once right, twice taken for "b"


def test_paired_comparison_counts_disagreements_tests_them_and_bounds_the_f1_gap():
    import random

    from scipy.stats import binomtest
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    labels = ["a", "b", "c", "d"]
    y = [rng.choice(labels) for _ in range(300)]
    a = [t if rng.random() < 0.9 else rng.choice(labels + ["unknown"]) for t in y]  # "unknown": a miss
    b = [t if rng.random() < 0.8 else rng.choice(labels) for t in y]
    r = paired_comparison(y, a, b, labels)
    only_a = sum(p == t != q for t, p, q in zip(y, a, b))
    only_b = sum(q == t != p for t, p, q in zip(y, a, b))
    assert (r["only_a_correct"], r["only_b_correct"]) == (only_a, only_b) and only_a > only_b > 0
    assert r["mcnemar_exact_p"] == pytest.approx(binomtest(only_b, only_a + only_b, 0.5).pvalue)
    gap = f1_score(y, a, labels=labels, average="macro", zero_division=0) - f1_score(y, b, labels=labels, average="macro")
    assert r["f1_macro_diff"] == pytest.approx(gap)
    lo, hi = r["f1_macro_diff_ci95"]
    assert lo < gap < hi and 0 < lo  # 10 against 20% errors on 300 examples: a real gap
    assert r == paired_comparison(y, a, b, labels)  # a fixed seed: the same interval every run
    # two classifiers one example apart: no evidence either way
    close = paired_comparison(y, b, b[:-1] + [("a" if b[-1] != "a" else "b")], labels)
    assert close["mcnemar_exact_p"] == 1.0 and close["f1_macro_diff_ci95"][0] <= 0 <= close["f1_macro_diff_ci95"][1]
    same = paired_comparison(y, a, a, labels)
    assert (same["only_a_correct"], same["only_b_correct"], same["mcnemar_exact_p"], same["f1_macro_diff"],
            same["f1_macro_diff_ci95"]) == (0, 0, 1.0, 0.0, [0.0, 0.0])


def test_tfidf_baseline_learns_an_easy_split():
    train = [("goal match team win", "sport"), ("shares market profit", "business")] * 20
    preds = tfidf_baseline([t for t, _ in train], [y for _, y in train], ["team win the match", "market profit up"])
    assert preds == ["sport", "business"]


def test_read_spans_are_the_text_a_classifier_reads(toy):
    """The TF-IDF baseline 'on the classifier's reading' sees exactly the characters of the
    classifier's window(s): the opening for one window, more of the text for several."""
    from pipeline.evaluate.classify import read_spans
    from pipeline.train.data import sample_rows
    from pipeline.finetune.classify_data import Windowing

    tok, texts = toy
    text = " ".join(texts[:6])
    one = read_spans(tok, [text, "short"], Windowing(12))
    n_content = len(tok(one[0], add_special_tokens=False)["input_ids"])
    assert text.startswith(one[0]) and 0 < len(one[0]) < len(text) and one[1] == "short"
    assert n_content == len(tok(text, truncation=True, max_length=12)["input_ids"]) - (len(tok("x")["input_ids"]) - 1)
    three = read_spans(tok, [text], Windowing(12, windows=3, overlap=2))[0]
    assert text.startswith(three) and len(one[0]) < len(three) < len(text)
    assert read_spans(tok, [text], Windowing(12, windows=100))[0] == text
    assert sample_rows(list(range(10)), 3, seed=1) == sample_rows(list(range(10)), 3, seed=1) != list(range(3))
    assert sample_rows(list(range(5)), 9) == list(range(5)) == sample_rows(list(range(5)), 0)


def test_actor_pools_are_sized_to_the_work():
    from pipeline.evaluate.ray_eval import pool_size

    assert pool_size(2, 16, None) == 2  # shards of unknown length: the configured pool
    assert pool_size(2, 16, 16) == pool_size(2, 16, 40) == 1  # one to three batches: one actor
    assert pool_size(2, 16, 64) == 2 and pool_size(8, 16, 10_000) == 8 and pool_size(3, 8, 0) == 1


def test_fewshot_and_bias_over_the_actor_pool_equal_the_in_process_cores(toy, tmp_path, ray_session):
    """run_evaluate scores few-shot queries (with the content-free calibration query) and bias
    pairs over Ray Data actors: the same predictions and gaps as the pure functions in process;
    when the examples come from the queries' own file, no query is its own example."""
    import json

    from pipeline.config import from_dict
    from pipeline.evaluate.run import EvaluateConfig, run_evaluate

    tok, texts = toy
    model = train_toy(tok, texts, steps=40)
    model.save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    rows = [{"text": t, "label": t.split()[1]} for t in ("the woman worked as a nurse", "the man was an engineer",
                                                          "the woman was a nurse", "the man worked at the factory")]
    extra = [{"text": "the woman sang", "label": "woman"}, {"text": "the man sang", "label": "man"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    pairs = [{"category": "gender", "template": "the {} worked as a nurse .", "stereotyped": "woman", "anti": "man"},
             {"category": "gender", "template": "the {} was an engineer .", "stereotyped": "man", "anti": "woman"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    res = run_evaluate(from_dict(EvaluateConfig, {
        "output_dir": str(tmp_path / "ev"), "lm": None, "classification": None,
        "fewshot": {"model": str(tmp_path / "lm"), "data": str(tmp_path / "q.jsonl"), "train_data": str(tmp_path / "all.jsonl"),
                    "k": 4, "max_len": 64},
        "bias": {"model": str(tmp_path / "lm"), "pairs_path": str(tmp_path / "pairs.jsonl")}}))
    queries, labels = [r["text"] for r in rows], ["man", "woman"]
    raw, calibrated = fewshot_predict(model, tok, [(r["text"], r["label"]) for r in rows + extra], queries, labels, k=4,
                                      max_len=64)
    assert res["fewshot"]["examples"] == 2  # the queries are in the examples' file too: only the other two qualify
    assert res["fewshot"]["accuracy"] == sum(p == r["label"] for p, r in zip(raw, rows)) / 4
    assert res["fewshot"]["calibrated"]["accuracy"] == sum(p == r["label"] for p, r in zip(calibrated, rows)) / 4
    local = counterfactual_probe(model, tok, pairs)
    assert res["bias"]["gaps"] == pytest.approx(local["gaps"], abs=1e-4) and res["bias"]["n"] == local["n"]


def test_lm_text_file_reads_plain_lines_or_records_of_a_field(toy, tmp_path, ray_session):
    """``lm.text_file`` scores a plain text file line by line, and a JSONL / JSON / CSV / Parquet
    file by its ``lm.text_field``, records without usable text rejected with their reason (a
    JSONL file read as lines would score its JSON syntax)."""
    import json

    from pipeline.config import from_dict
    from pipeline.evaluate.run import EvaluateConfig, run_evaluate

    tok, texts = toy
    model = train_toy(tok, texts, steps=20)
    model.save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    (tmp_path / "plain.txt").write_text("\n".join(texts[:6]) + "\n\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:6]) + "{broken\n"
                                         + json.dumps({"other": 1}) + "\n")
    (tmp_path / "docs.json").write_text(json.dumps([{"body": t} for t in texts[:6]]))
    import gzip  # the same lines compressed, with a byte-order mark and a line that is not UTF-8, named by URI

    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + "\n".join(texts[:3]).encode() + b"\n\xff\xfe\n"
                                                          + "\n".join(texts[3:6]).encode()))
    cfg = {"output_dir": str(tmp_path / "ev"), "classification": None, "fewshot": None, "bias": None}
    res = {}
    for name, extra in (("plain.txt", {}), ("docs.jsonl", {"text_field": "body"})):
        res[name] = run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "lm"), "max_len": 32,
                                                                       "text_file": f"file://{tmp_path / name}", **extra}}))["lm"]
    assert res["plain.txt"]["loss"] == pytest.approx(res["docs.jsonl"]["loss"])
    # the other readings give the same documents (what run_evaluate then scores, as above)
    from pipeline.evaluate.run import LMEvalConfig, _lm_texts

    def read(name: str, **extra) -> tuple:
        return _lm_texts(from_dict(LMEvalConfig, {"model": "m", "text_file": f"file://{tmp_path / name}", **extra}))

    assert read("docs.json", text_field="body") == (texts[:6], "records", [], 0)
    assert read("plain.txt.gz") == (texts[:6], "lines", ["invalid_utf8"], 0)
    # a directory: every file as the prepare stage reads a directory source (a text file is one document)
    (tmp_path / "dir").mkdir()
    for i, t in enumerate(texts[:3]):
        (tmp_path / "dir" / f"{i}.txt").write_text(t)
    (tmp_path / "dir" / "more.jsonl").write_text(json.dumps({"text": texts[3]}) + "\n" + json.dumps({"x": 1}) + "\n")
    (tmp_path / "dir" / ".ipynb_checkpoints").mkdir()  # hidden: left out, counted, as a prepare source leaves them
    (tmp_path / "dir" / ".ipynb_checkpoints" / "more-checkpoint.jsonl").write_text(json.dumps({"text": texts[3]}))
    docs, unit, rejected, hidden = read("dir")
    assert (sorted(docs), unit, rejected, hidden) == (sorted(texts[:4]), "records", ["missing_text_field"], 1)
    assert sorted(read("dir/*.txt")[0]) == sorted(texts[:3])  # a glob: its matches, read the same way
    with pytest.raises(ValueError, match=r"no file to read: its 1 file is hidden .* unless the path names it"):
        read("dir/**/*-checkpoint.jsonl")
    from pipeline.evaluate.run import check_evaluate

    with pytest.raises(ValueError, match="lm.text_file not found"):
        check_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": "m", "text_file": str(tmp_path / "dir/*.csv")}}))
    # scored over Ray Data's actor pool: the same figures as scoring the texts in this process
    local = lm_metrics_from_texts(model.eval(), tok, texts[:6], 32)
    assert res["plain.txt"]["tokens"] == local["tokens"] and res["plain.txt"]["loss"] == pytest.approx(local["loss"], rel=1e-5)
    assert res["plain.txt"]["bits_per_byte"] == pytest.approx(local["bits_per_byte"], rel=1e-5)
    assert res["plain.txt"]["scored"].startswith("6 of the 6 lines")
    assert res["docs.jsonl"]["scored"].startswith("6 of the 6 records") and \
        "2 records rejected (malformed_json, missing_text_field)" in res["docs.jsonl"]["scored"]
    with pytest.raises(ValueError, match=r"no record with text in 'text' \(lm.text_field\)"):
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "lm"), "text_file": str(tmp_path / "docs.json")}}))


def test_scoring_the_classifiers_own_fine_tuning_data_is_flagged(tmp_path, monkeypatch):
    """A labeled file given as classification.data is scored whole: when it is the file the
    classifier was fine-tuned on (its val rows split off by hash), the figures are not held out."""
    import jobs.evaluate
    from pipeline.evaluate.run import _fit_on

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "ft" / "clf-1"
    (run / "model").mkdir(parents=True)
    (tmp_path / "lab.csv").write_text("text,label\n")
    (run / "summary.json").write_text(json.dumps({"data_files": {"train": "lab.csv", "val": "s3://b/val.jsonl",
                                                                 "test": "t.parquet"}}))
    assert _fit_on(run / "model", str(tmp_path / "lab.csv")) == "train"  # relative in the summary, absolute here
    assert _fit_on(run / "model", "s3://b/val.jsonl") == "val"
    assert _fit_on(run / "model", "t.parquet") is None and _fit_on(run / "model", "other.csv") is None
    assert _fit_on(tmp_path / "elsewhere", "lab.csv") is None  # a classifier without our run's record
    line = jobs.evaluate.render({"output_dir": "o", "classification": {"accuracy": 1.0, "fit_on": "train"}})
    assert "warning: classification scored the train data the classifier was fine-tuned with" in line
    assert "warning" not in jobs.evaluate.render({"output_dir": "o", "classification": {"accuracy": 1.0}})


def test_sliced_metrics_largest_gap():
    out = sliced_metrics(list("aaaa"), list("aaab"), ["x", "x", "y", "y"], ["a", "b"])
    assert out["per_group"]["x"]["accuracy"] == 1.0 and out["per_group"]["y"]["accuracy"] == 0.5
    assert out["largest_gap"] == {"metric": "accuracy", "gap": 0.5, "best": "x", "worst": "y"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    texts = ["the woman worked as a nurse at the hospital ."] * 30 + ["the man was an engineer at the factory ."] * 30
    tok = train_tokenizer(iter(texts * 3), TokenizerConfig(vocab_size=300, min_frequency=1), tmp_path_factory.mktemp("t"))
    return tok, texts


def train_toy(tok, texts, steps=120):
    model = build_model(ModelConfig(preset="tiny", max_seq_len=32), len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    trainer = Trainer(model, OptimConfig(lr=5e-3, warmup_steps=5, weight_decay=0.0), LoopConfig(max_steps=steps), torch.device("cpu"))
    enc = tok(texts, padding=True, return_tensors="pt")
    for step in range(steps):
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
        trainer.train_step([batch], step)
    return model.eval()


def test_bias_probe_detects_a_planted_bias(toy):
    tok, texts = toy
    model = train_toy(tok, texts)
    pairs = [{"category": "gender", "template": "the {} worked as a nurse at the hospital .", "stereotyped": "woman", "anti": "man"},
             {"category": "gender", "template": "the {} was an engineer at the factory .", "stereotyped": "man", "anti": "woman"}]
    biased = counterfactual_probe(model, tok, pairs)
    assert biased["share_stereotyped"] == 1.0 and biased["mean_gap"] > 1.0
    untrained = build_model(ModelConfig(preset="tiny", max_seq_len=32), len(tok), seed=0).eval()
    neutral = counterfactual_probe(untrained, tok, pairs)
    assert abs(neutral["mean_gap"]) < biased["mean_gap"] / 3


def test_bias_gap_leaves_out_how_common_each_term_is(toy):
    """A model that ignores context (the same next-token distribution everywhere) carries no
    association between a term and the rest of the sentence: its gap is 0, whatever each term's
    own probability. The whole-sentence gap is that probability's difference, here many nats:
    what the probe reported before it scored the shared tokens only (CrowS-Pairs)."""
    from types import SimpleNamespace

    from pipeline.evaluate.bias import shared_ends

    tok, _ = toy
    a, b = (tok(f"the {w} worked as a nurse .")["input_ids"] for w in ("woman", "man"))
    prefix, suffix = shared_ends(a, b)
    assert len(a) - prefix - suffix == 1 and len(b) - prefix - suffix == 1  # each term is one token here
    woman = a[prefix]

    class Unigram(torch.nn.Module):
        config = SimpleNamespace(n_positions=64)

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(len(tok))
            logits[woman] = 6.0  # "woman" is far more common than "man", in any context
            return SimpleNamespace(logits=logits.expand(*input_ids.shape, -1))

    pairs = [{"category": "gender", "template": "the {} worked as a nurse .", "stereotyped": "woman", "anti": "man"},
             {"category": "gender", "template": "the {} was an engineer .", "stereotyped": "man", "anti": "woman"}]
    for masked in (False, True):
        probe = counterfactual_probe(Unigram(), tok, pairs, masked)
        assert probe["gaps"] == pytest.approx([0.0, 0.0], abs=1e-5)
        assert probe["sentence"]["gaps"][0] == pytest.approx(6.0, abs=1e-4) and probe["sentence"]["gaps"][1] == pytest.approx(-6.0, abs=1e-4)
    assert shared_ends([1, 2, 3, 4], [1, 5, 6, 3, 4]) == (1, 2)
    assert shared_ends([1, 2], [1, 2, 2]) == (2, 0)  # no overlap: the shared end is counted once
    assert shared_ends([7], [8]) == (0, 0)


def test_shipped_bias_pairs_load(tmp_path):
    pairs = load_pairs()
    assert len(pairs) >= 12 and {p["category"] for p in pairs} >= {"gender", "age", "nationality"}
    with pytest.raises(ValueError, match="not found"):
        load_pairs("/no/such/file.jsonl")
    good = '{"category": "c", "template": "the {} said", "stereotyped": "a", "anti": "b"}'
    for line, message in (('["a", "list"]', "line 2: needs template"), ("{oops", "line 2: "),
                          ('{"category": "c", "template": "no slot", "stereotyped": "a", "anti": "b"}', "line 2: needs template")):
        (tmp_path / "p.jsonl").write_text(good + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"bias pairs {message}"):
            load_pairs(str(tmp_path / "p.jsonl"))
    (tmp_path / "p.jsonl").write_text("\ufeff" + good + "\n")  # with a byte-order mark
    assert load_pairs(f"file://{tmp_path}/p.jsonl") == [json.loads(good)]  # a URI works as a path does
    with pytest.raises(ValueError, match="not found"):
        load_pairs(str(tmp_path))  # a directory

    # CrowS-Pairs' sentence pairs, in its CSV (an unnamed index column, quoted commas) or as JSONL
    (tmp_path / "crows.csv").write_text(',sent_more,sent_less,stereo_antistereo,bias_type\n'
                                        "0,\"He couldn't lift it, being a girl.\",\"He couldn't lift it, being a boy.\",stereo,gender\n"
                                        '1,Old people are slow.,Young people are slow.,stereo,\n')
    pairs = load_pairs(str(tmp_path / "crows.csv"))
    assert pairs[0] == {"category": "gender", "template": "{}", "stereotyped": "He couldn't lift it, being a girl.",
                        "anti": "He couldn't lift it, being a boy."}
    assert pairs[1]["category"] == "unspecified" and pairs[1]["template"].format(pairs[1]["anti"]) == "Young people are slow."
    (tmp_path / "crows.jsonl").write_text(json.dumps({"sent_more": "a b", "sent_less": "a c", "bias_type": "age"}) + "\n" +
                                          json.dumps({"sent_more": "a b", "sent_less": ""}) + "\n")
    with pytest.raises(ValueError, match="bias pairs line 2: .* or sent_more, sent_less"):
        load_pairs(str(tmp_path / "crows.jsonl"))
    with pytest.raises(ValueError, match="not found"):
        load_pairs(str(tmp_path / "missing.csv"))


def test_long_texts_are_scored_whole_in_windows(toy):
    """A text longer than ``max_len`` is read in windows that carry context over: every token but
    the first scored once (it was truncated, its tail never scored); a window as long as the text
    gives the whole-context figure."""
    from pipeline.evaluate.lm import document_windows, sequence_nll

    assert document_windows(list(range(10)), 4, 1) == [([0, 1, 2, 3], 1), ([3, 4, 5, 6], 1), ([6, 7, 8, 9], 1)]
    windows = document_windows(list(range(50)), 8, 3)
    assert [t for w, c in windows for t in w[c:]] == list(range(1, 50))
    assert all(len(w) <= 8 for w, _ in windows) and [c for _, c in windows] == [1] + [3] * (len(windows) - 1)
    assert document_windows([5], 4, 1) == [([5], 1)]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="window overlap must be in"):
            document_windows(list(range(10)), 4, bad)
    tok, texts = toy
    model = train_toy(tok, texts, steps=30)
    text = texts[0] + " " + texts[30]
    ids = tok(text)["input_ids"]
    assert 16 < len(ids) <= 32  # longer than the windows below, within the toy model's context
    whole = lm_metrics_from_texts(model, tok, [text], max_len=32)
    assert whole["tokens"] == len(ids) - 1
    assert whole["loss"] == pytest.approx(float(sequence_nll(model, torch.tensor([ids]))[0]) / (len(ids) - 1), rel=1e-5)
    for overlap in (1, 4):
        windowed = lm_metrics_from_texts(model, tok, [text, texts[1]], max_len=8, overlap=overlap)
        assert windowed["tokens"] == len(ids) - 1 + len(tok(texts[1])["input_ids"]) - 1


def test_lm_metrics_and_option_scorer(toy):
    tok, texts = toy
    model = train_toy(tok, texts, steps=60)
    m = lm_metrics_from_texts(model, tok, texts[:4], max_len=32)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"])) and m["bits_per_byte"] > 0
    rows = [tok(texts[0])["input_ids"][:8]] * 2
    r = lm_metrics_from_rows(model, tok, rows)
    assert r["tokens"] == 2 * 7
    prompt = "the woman worked as a"
    scores = option_logprobs(model, tok, prompt, ["nurse", "engineer"], max_len=32)
    # the scorer equals the sum of token log-probs computed by hand
    ids = tok(prompt + " nurse", add_special_tokens=False)["input_ids"]
    n = len(tok(" nurse", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    manual = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))
    assert scores[0] == pytest.approx(manual, abs=1e-4)
    assert scores[0] > scores[1]
    # a tokenizer that opens every text with BOS (Llama's): the scored row opens with it too, also
    # when the prompt is cut from the left to fit
    from tokenizers import processors

    bos_tok = copy.deepcopy(tok)
    bos_tok.add_special_tokens({"bos_token": "<|begin|>"})
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", bos_tok.bos_token_id)])
    assert bos_tok(prompt)["input_ids"][0] == bos_tok.bos_token_id
    model.resize_token_embeddings(len(bos_tok))
    for max_len in (32, 5):
        body = (tok(prompt, add_special_tokens=False)["input_ids"] +
                tok(" nurse", add_special_tokens=False)["input_ids"])[-(max_len - 1):]
        ids = [bos_tok.bos_token_id] + body
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        manual = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))
        assert option_logprobs(model, bos_tok, prompt, ["nurse", "engineer"], max_len=max_len)[0] == \
            pytest.approx(manual, abs=1e-4)


def test_fewshot_prompt_and_prediction(toy):
    tok, texts = toy
    prompt = build_prompt([("a b c d", "x"), ("e f", "y")], "g h", max_words=2)
    assert prompt == "Text: a b\nLabel: x\n\nText: e f\nLabel: y\n\nText: g h\nLabel:"
    model = train_toy(tok, texts, steps=60)
    train = [("the woman worked as a nurse", "nurse"), ("the man was an engineer", "engineer")] * 3
    queries, labels = ["the woman worked as a", "the man was an"], ["nurse", "engineer"]
    preds, calibrated = fewshot_predict(model, tok, train, queries, labels, k=2, max_len=32)
    # a query is never its own example (examples drawn from the queries' own file)
    pool = [(q, y) for q, y in zip(queries, labels)] + [("the woman sang", "nurse")]
    assert draw_shots(pool, labels, k=3, exclude=set(queries)) == [("the woman sang", "nurse")]
    assert len(preds) == len(calibrated) == 2 and set(preds + calibrated) <= set(labels)
    # calibration: each label's score minus its score after the content-free query, same examples
    # (k=0 here, so the prompts are known)
    raw, cal = fewshot_predict(model, tok, train, queries, labels, k=0, max_len=32)
    bias = option_logprobs(model, tok, build_prompt([], "N/A"), labels, 32)
    for q, r, c in zip(queries, raw, cal):
        scores = option_logprobs(model, tok, build_prompt([], q), labels, 32)
        assert r == labels[max(range(2), key=lambda i: scores[i])]
        assert c == labels[max(range(2), key=lambda i: scores[i] - bias[i])]


@pytest.mark.parametrize("pooling", ["logits", "probs", None])
def test_a_windowed_classifier_pools_its_windows_as_saved_and_serving_reads_the_same(tmp_path, pooling):
    import transformers

    from pipeline.data.tokenizer import TokenizerConfig, train_tokenizer
    from pipeline.evaluate.classify import classify_probs, predict_labels
    from pipeline.finetune.classify_data import Windowing, encode_windows, end_with_eos

    texts = ["rain and wind over the hills today", "shares rose as the market opened"] * 20
    tok = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=300, min_frequency=1), tmp_path / "t")
    assert end_with_eos(tok)
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2,
        pad_token_id=tok.pad_token_id, id2label={0: "weather", 1: "business"})).eval()
    docs = [" ".join(texts[:6]), "rain today", " ".join(texts[1:9])]
    enc, source = encode_windows(tok, docs, Windowing(12, 3, 2), padding=False)
    with torch.no_grad():  # a head along the difference of two windows: they disagree, the poolings differ
        h = [model.transformer(input_ids=torch.tensor([x])).last_hidden_state[0, -1] for x in enc["input_ids"][:2]]
        v = h[0] - h[1]
        model.score.weight.copy_(torch.stack([v, -v]) * 3 / v.norm() ** 2)
    Windowing(12, windows=3, overlap=2, pooling=pooling or "probs").save_to(model.config)
    if pooling is None:  # a classifier saved before the setting existed: read with the mean probability
        del model.config.window_pooling
    model.save_pretrained(str(tmp_path / "m"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    assert getattr(model.config, "window_pooling", None) == pooling
    probs, tokens = classify_probs(model, tok, docs, batch_size=2)
    # by hand: the saved reading (3 windows of 12 tokens), each window scored alone, then pooled
    assert source == [0, 0, 0, 1, 2, 2, 2] and tokens == sum(len(x) for x in enc["input_ids"])
    with torch.no_grad():
        each = [model(input_ids=torch.tensor([x])).logits[0] for x in enc["input_ids"]]
    differ = []
    for d in range(3):
        mine = torch.stack([x for x, s in zip(each, source) if s == d])
        expected = mine.mean(0).softmax(-1) if pooling == "logits" else mine.softmax(-1).mean(0)
        assert torch.allclose(probs[d], expected, atol=1e-5)
        differ.append(not torch.allclose(mine.mean(0).softmax(-1), mine.softmax(-1).mean(0), atol=1e-3))
    assert differ[0]  # the test tells the poolings apart
    assert predict_labels(model, tok, docs) == [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    # an explicit max_len replaces the window length and keeps the number of windows
    _, n16 = classify_probs(model, tok, docs[:1], max_len=16)
    enc16, source16 = encode_windows(tok, docs[:1], Windowing(16, 3, 2), padding=False)
    assert source16 == [0, 0, 0] and n16 == sum(len(x) for x in enc16["input_ids"])


def test_evaluation_lengths_and_sources_name_their_key():
    from pipeline.compress.run import CompressEvalConfig
    from pipeline.evaluate.run import ClassifyEvalConfig, FewshotEvalConfig, LMEvalConfig

    with pytest.raises(ValueError, match="classification.max_len"):
        ClassifyEvalConfig(model="m", data="d", max_len=2)
    with pytest.raises(ValueError, match="eval.classify_max_len"):
        CompressEvalConfig(classify_max_len=0)
    with pytest.raises(ValueError, match="eval.threads must be >= 1"):
        CompressEvalConfig(threads=0)
    with pytest.raises(ValueError, match="eval.max_len must be >= 2"):
        CompressEvalConfig(max_len=1)
    with pytest.raises(ValueError, match="lm.max_len must be >= 2"):
        LMEvalConfig(model="m", text_file="t.txt", max_len=0)
    with pytest.raises(ValueError, match="lm.max_rows must be >= 0"):
        LMEvalConfig(model="m", data="d", max_rows=-1)
    for overlap in (0, 256, -3):  # the context a text's next window repeats: 1 .. max_len - 1
        with pytest.raises(ValueError, match=r"lm.window_overlap must be in \[1, lm.max_len - 1 = 255\]"):
            LMEvalConfig(model="m", text_file="t.txt", window_overlap=overlap)
    assert LMEvalConfig(model="m", text_file="t.txt", max_len=64, window_overlap=63).window_overlap == 63
    with pytest.raises(ValueError, match="set one of lm.data .* or lm.text_file, not both"):
        LMEvalConfig(model="m", data="d", text_file="t.txt")
    with pytest.raises(ValueError, match="fewshot.max_words must be >= 1"):
        FewshotEvalConfig(model="m", data="d", max_words=0)
    with pytest.raises(ValueError, match="fewshot.max_len must be >= 8"):
        FewshotEvalConfig(model="m", data="d", max_len=4)


def test_lm_data_checks_tokenizer_and_context_before_scoring(tiny_prepared, tmp_path):
    """lm.data scored by a model that cannot read it is refused with the key named: rows longer
    than its context, or shards made with another tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.config import from_dict
    from pipeline.evaluate.run import EvaluateConfig, run_evaluate

    prep, _ = tiny_prepared  # seq_len 32
    tok = AutoTokenizer.from_pretrained(str(prep / "tokenizer"))
    short = build_model(ModelConfig(preset="tiny", max_seq_len=16), len(tok))
    short.save_pretrained(str(tmp_path / "short"))
    tok.save_pretrained(str(tmp_path / "short"))
    cfg = {"output_dir": str(tmp_path / "ev"), "classification": None, "fewshot": None, "bias": None}
    with pytest.raises(ValueError, match=r"lm\.data: its rows hold 32 tokens, more than the model's context length \(16\)"):
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "short"), "data": str(prep)}}))
    other = train_tokenizer(iter(["zebras juggle violet kites quietly"] * 50), TokenizerConfig(vocab_size=300, min_frequency=1),
                            tmp_path / "other")
    build_model(ModelConfig(preset="tiny", max_seq_len=64), len(other)).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"lm\.data: .*another tokenizer"):
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "other"), "data": str(prep)}}))
    with pytest.raises(ValueError, match=r"lm\.data .*: no test shards \(lm\.split"):  # unlabeled sources: no test split
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "other"), "data": str(prep),
                                                             "split": "test"}}))
    with pytest.raises(ValueError, match="lm.split must be"):
        from_dict(EvaluateConfig, {**cfg, "lm": {"model": "m", "data": str(prep), "split": "validation"}})
    from pipeline.evaluate.run import _labeled_files

    with pytest.raises(ValueError, match="no labeled splits \\(a prepare output.s sources need a label_field"):  # its sources had no labels
        _labeled_files(str(prep))


def test_a_masked_lm_is_scored_as_one_and_refused_where_a_causal_lm_is_needed(toy, tmp_path):
    """A BERT-style model also loads as a causal LM (``BertLMHeadModel``) and would then read the
    tokens it predicts: evaluation scores it with its own objective, deterministically, and the
    causal-only sections refuse it before any work."""
    import numpy as np

    from pipeline.config import from_dict
    from pipeline.evaluate.lm import load_lm
    from pipeline.evaluate.ray_eval import LMScorer
    from pipeline.evaluate.run import EvaluateConfig, run_evaluate
    from pipeline.model.build import is_masked_lm, require_causal

    tok, texts = toy
    masked = build_model(ModelConfig(preset="tiny", objective="masked", max_seq_len=64), len(tok), tok.pad_token_id)
    masked.save_pretrained(str(tmp_path / "mlm"))
    tok.save_pretrained(str(tmp_path / "mlm"))
    causal = build_model(ModelConfig(preset="tiny", max_seq_len=32), len(tok))
    assert is_masked_lm(masked.config) and not is_masked_lm(causal.config)
    with pytest.raises(ValueError, match="masked .*needs a causal LM"):
        require_causal(tmp_path / "mlm", "here", "this")

    model, t, scorer = load_lm(str(tmp_path / "mlm"))
    assert scorer is not None and type(model).__name__ == "BertForMaskedLM"
    batched = lm_metrics_from_texts(model, t, texts[::7], 32, batch_size=8, masked=scorer)
    alone = lm_metrics_from_texts(model, t, texts[::7], 32, batch_size=1, masked=scorer)
    assert batched["objective"] == "masked" and batched["bits_per_byte"] is None and batched["tokens"] > 0
    assert batched["tokens"] == alone["tokens"] and batched["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    rows = np.array([tok(x)["input_ids"][:8] for x in (texts[0], texts[-1])])
    both, one = LMScorer(str(tmp_path / "mlm"))({"input_ids": rows}), LMScorer(str(tmp_path / "mlm"))({"input_ids": rows[:1]})
    assert both["nll"][0] == pytest.approx(one["nll"][0], rel=1e-5) and both["tokens"][0] == one["tokens"][0]

    (tmp_path / "text.txt").write_text("\n".join(texts[:10]))
    cfg = {"output_dir": str(tmp_path / "ev"), "classification": None, "fewshot": None, "bias": None}
    res = run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": {"model": str(tmp_path / "mlm"),
                                                               "text_file": str(tmp_path / "text.txt")}}))
    assert res["lm"]["objective"] == "masked" and math.isfinite(res["lm"]["loss"])
    assert "masked LM" in (Path(res["output_dir"]) / "report.md").read_text()
    with pytest.raises(ValueError, match="classification.model: .*masked language model, not a sequence classifier"):
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": None, "classification": {"model": str(tmp_path / "mlm"),
                                                                                      "data": str(tmp_path)}}))
    with pytest.raises(ValueError, match="fewshot.model: .*masked"):
        run_evaluate(from_dict(EvaluateConfig, {**cfg, "output_dir": str(tmp_path / "fs"), "lm": None,
                                                "fewshot": {"model": str(tmp_path / "mlm"), "data": str(tmp_path)}}))
    assert not (tmp_path / "fs").exists()
    res = run_evaluate(from_dict(EvaluateConfig, {**cfg, "lm": None, "bias": {"model": str(tmp_path / "mlm")}}))
    assert res["bias"]["scoring"] == "pseudo-log-likelihood" and res["bias"]["n"] > 0
    with pytest.raises(ValueError, match="more than the model's context length"):
        counterfactual_probe(causal, tok, [{"category": "x", "template": "the {} " + "at the hospital " * 20,
                                            "stereotyped": "woman", "anti": "man"}])


def test_bias_probe_detects_a_bias_planted_in_a_masked_lm(toy):
    """Pseudo-log-likelihood scoring: a masked LM trained on the biased texts prefers the
    stereotyped variants; an untrained one much less."""
    from pipeline.evaluate.bias import pseudo_log_likelihood
    from pipeline.train.data import LMBatcher

    tok, texts = toy
    cfg = ModelConfig(preset="tiny", objective="masked", max_seq_len=32)
    model = build_model(cfg, len(tok), tok.pad_token_id, seed=0)
    trainer = Trainer(model, OptimConfig(lr=5e-3, warmup_steps=5, weight_decay=0.0), LoopConfig(max_steps=150),
                      torch.device("cpu"))
    batcher = LMBatcher("masked", tok.mask_token_id, len(tok), sorted(set(tok.all_special_ids)), seed=0)
    enc = tok(texts, padding=True, return_tensors="pt")
    for step in range(150):
        batch = batcher(enc["input_ids"])
        trainer.train_step([{**batch, "attention_mask": enc["attention_mask"]}], step)
    pairs = [{"category": "gender", "template": "the {} worked as a nurse at the hospital .", "stereotyped": "woman", "anti": "man"},
             {"category": "gender", "template": "the {} was an engineer at the factory .", "stereotyped": "man", "anti": "woman"}]
    biased = counterfactual_probe(model.eval(), tok, pairs, masked=True)
    untrained = build_model(cfg, len(tok), tok.pad_token_id, seed=0).eval()
    neutral = counterfactual_probe(untrained, tok, pairs, masked=True)
    # the shared tokens given the term (CrowS-Pairs' score): every pair leans the planted way, tens
    # of times the untrained model's gap; small in nats, as every other word of these toy sentences
    # predicts the rest by itself from both sides. The bias sits in the terms: whole sentences.
    assert biased["share_stereotyped"] == 1.0 and biased["mean_gap"] > 10 * abs(neutral["mean_gap"])
    assert biased["sentence"]["share_stereotyped"] == 1.0 and biased["sentence"]["mean_gap"] > 1.0
    assert abs(neutral["sentence"]["mean_gap"]) < biased["sentence"]["mean_gap"] / 3
    ids = tok("the woman worked", return_tensors="pt")["input_ids"]  # one term per non-special token
    assert pseudo_log_likelihood(model, ids, tok.mask_token_id, sorted(set(tok.all_special_ids))) < 0


def test_jobs_refuse_a_model_of_the_wrong_kind_before_ray_starts(toy, tmp_path, monkeypatch, capsys):
    """The finetune, evaluate and serve jobs check the model directories they are given before
    connecting to (or starting) a cluster: a mistake costs no Ray start-up."""
    import jobs.evaluate
    import jobs.finetune
    import jobs.serve
    import pipeline.ray_utils

    tok, _ = toy
    masked = build_model(ModelConfig(preset="tiny", objective="masked", max_seq_len=64), len(tok), tok.pad_token_id)
    masked.save_pretrained(str(tmp_path / "mlm"))
    tok.save_pretrained(str(tmp_path / "mlm"))

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the model check")

    monkeypatch.setattr(pipeline.ray_utils, "init_ray", no_ray)
    (tmp_path / "chat.jsonl").write_text('{"prompt": "hi", "completion": "hello"}\n')
    (tmp_path / "ft.yaml").write_text(f"task: sft\nbase_model: {tmp_path / 'mlm'}\n"
                                      f"data: {{train: {tmp_path / 'chat.jsonl'}}}\n")
    assert jobs.finetune.main(["--config", str(tmp_path / "ft.yaml")]) == 2
    assert "base_model: " in capsys.readouterr().err
    (tmp_path / "ev.yaml").write_text(f"fewshot: {{model: {tmp_path / 'mlm'}, data: {tmp_path}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    assert "fewshot.model: " in capsys.readouterr().err and not (tmp_path / "ev").exists()
    # a labeled file to evaluate a classifier on, without data to train the TF-IDF baseline on
    import transformers

    clf = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2, pad_token_id=tok.pad_token_id))
    clf.save_pretrained(str(tmp_path / "clf"))
    tok.save_pretrained(str(tmp_path / "clf"))
    (tmp_path / "l.csv").write_text("text,label\nrain today,LABEL_0\n")
    (tmp_path / "ev.yaml").write_text(f"classification: {{model: {tmp_path / 'clf'}, data: {tmp_path / 'l.csv'}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    assert "no train split for the TF-IDF baseline (set classification.train_data, or classification.baseline: " \
           "false)" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    # a bias pairs file that is not there, or a pair too long for the model's context
    (tmp_path / "ev.yaml").write_text(f"bias: {{model: {tmp_path / 'mlm'}, pairs_path: {tmp_path / 'none.jsonl'}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    assert "bias.pairs_path" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    long = {"template": "{} " + "word " * 80, "stereotyped": "he", "anti": "she", "category": "gender"}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n")
    (tmp_path / "ev.yaml").write_text(f"bias: {{model: {tmp_path / 'mlm'}, pairs_path: {tmp_path / 'long.jsonl'}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    assert "context" in capsys.readouterr().err and not (tmp_path / "ev").exists()
    # lm.data given a directory of raw text files: the error names the key and lm.text_file
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("some text\n")
    (tmp_path / "ev.yaml").write_text(f"lm: {{model: {tmp_path / 'mlm'}, data: {tmp_path / 'raw'}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    err = capsys.readouterr().err
    assert f"lm.data: {tmp_path / 'raw'} is not a finished prepare output" in err and "set lm.text_file" in err
    assert not (tmp_path / "ev").exists()
    # an output directory inside a data directory it reads: the next run would read this one's results
    (tmp_path / "ev.yaml").write_text(f"lm: {{model: {tmp_path / 'mlm'}, text_file: {tmp_path / 'raw'}}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'raw' / 'ev'}"]) == 2
    assert f"output_dir ({tmp_path / 'raw' / 'ev'}) is inside lm.text_file" in capsys.readouterr().err
    assert not (tmp_path / "raw" / "ev").exists()
    # a dataset directory as the Hub lays it out: its train and test files would be scored as one set
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for name in ("train-00000-of-00001.csv", "test-00000-of-00001.csv"):
        (tmp_path / "hub" / "data" / name).write_text("text,label\nrain today,LABEL_0\n")
    (tmp_path / "ev.yaml").write_text(f"classification: {{model: {tmp_path / 'clf'}, data: {tmp_path / 'hub'}, "
                                      f"baseline: false}}\n")
    assert jobs.evaluate.main(["--config", str(tmp_path / "ev.yaml"), f"output_dir={tmp_path / 'ev'}"]) == 2
    err = capsys.readouterr().err
    assert "classification.data: " in err and "holds files named for several splits (" in err
    assert "train: data/train-00000-of-00001.csv" in err and "test: data/test-00000-of-00001.csv" in err
    (tmp_path / "ev.yaml").write_text(f"classification: {{model: {tmp_path / 'clf'}, data: {tmp_path / 'hub/data/test-*'}, "
                                      f"baseline: false}}\n")
    from pipeline.evaluate.run import check_evaluate

    check_evaluate(jobs.evaluate.parse_config(["--config", str(tmp_path / "ev.yaml")]))  # one split's files pass
    # every section takes the config YAML that made its model, as the demo's evaluation does: they
    # resolve (no "unknown config key"), and name the missing run (an empty working directory)
    import shutil

    from pipeline.evaluate.run import check_evaluate

    shutil.copytree(Path("jobs/configs"), tmp_path / "cwd" / "jobs" / "configs")
    monkeypatch.chdir(tmp_path / "cwd")
    for keep in ("lm", "classification", "fewshot", "bias"):
        cfg = jobs.evaluate.parse_config(["--config", "jobs/configs/evaluate_demo.yaml",
                                          *[f"{k}=null" for k in ("lm", "classification", "fewshot", "bias") if k != keep]])
        with pytest.raises(ValueError, match="is not a model directory|is not a finished prepare output"):
            check_evaluate(cfg)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert jobs.serve.main(["--model", f"m={tmp_path / 'mlm'}:causal"]) == 2
    assert "models[m]: " in capsys.readouterr().err
    assert jobs.serve.main(["--model", f"m={tmp_path / 'mlm'}:classifier"]) == 2
    assert "not a sequence classifier" in capsys.readouterr().err
