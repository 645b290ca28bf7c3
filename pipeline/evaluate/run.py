"""The evaluation job: language modeling, classification (with a TF-IDF baseline on the same
split), few-shot in-context classification and bias probes; JSON results and a markdown report
with plots. Sections are optional: ``null`` skips one."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check, check_local, check_name, check_output_outside, check_seed, config_hash, to_dict
from pipeline.finetune.classify_data import label_name, read_labeled_rows
from pipeline.train.checkpoint import write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LMEvalConfig:
    model: str  # causal or masked LM directory, or the pretrain config YAML that made it
    data: str | None = None  # prepare output (dir or config YAML): the shards of its `split`
    split: str = "val"  # val | test | train
    text_file: str | None = None  # or a text file (one document per non-empty line), or a JSONL / JSON / CSV /
    text_field: str = "text"       # Parquet file or saved HF dataset whose text_field holds the documents
    max_rows: int = 0  # 0 = every val row; else a seeded random sample of the val rows (or texts)
    seed: int = 0
    max_len: int = 256  # tokens per window (the model's context at most); a longer text is read in several
    window_overlap: int | None = None  # tokens of context a text's next window repeats (null: max_len // 4)

    def __post_init__(self) -> None:
        check((self.data is None) != (self.text_file is None),
              "lm: set one of lm.data (a prepare output's shards) or lm.text_file, not both"
              if self.data is not None else "lm: set lm.data or lm.text_file")
        check(self.max_len >= 2, f"lm.max_len must be >= 2 (tokens per window), got {self.max_len}")
        check(self.window_overlap is None or 1 <= self.window_overlap < self.max_len,
              f"lm.window_overlap must be in [1, lm.max_len - 1 = {self.max_len - 1}] (tokens of context a text's "
              f"next window repeats), got {self.window_overlap}")
        check(self.max_rows >= 0, f"lm.max_rows must be >= 0 (0: every row), got {self.max_rows}")
        check(self.split in ("val", "test", "train"), f"lm.split must be val, test or train, got {self.split!r}")
        # no key silently ignored: split picks lm.data's shards, text_field reads lm.text_file's records
        check(self.text_file is None or self.split == "val",
              f"lm.split ({self.split}) picks the shards of lm.data; lm.text_file is read whole")
        check(self.data is None or self.text_field == "text",
              f"lm.text_field ({self.text_field}) reads the records of lm.text_file; lm.data's shards are tokens already")
        check_seed(self.seed, "lm.seed")


@dataclass(frozen=True, kw_only=True)
class ClassifyEvalConfig:
    model: str  # sequence-classification directory, or the finetune config YAML that made it
    data: str  # prepare output (dir or YAML) with labeled splits, or a labeled file for the test split
    train_data: str | None = None  # for the baseline when data is a single file
    split: str = "test"
    text_field: str = "text"
    label_field: str = "label"
    group_field: str | None = "source"  # slice metrics by this column (bias/fairness); null to skip
    baseline: bool = True
    # tokens per window; null: the reading saved with the classifier at fine-tuning (window length
    # and number of windows), else 256
    max_len: int | None = None

    def __post_init__(self) -> None:
        check(self.max_len is None or self.max_len >= 8,
              f"classification.max_len must be >= 8 or null, got {self.max_len}")


@dataclass(frozen=True, kw_only=True)
class FewshotEvalConfig:
    model: str  # causal LM directory or pretrain YAML
    data: str  # prepare output (dir or YAML) with labeled splits, or a labeled file of queries
    train_data: str | None = None  # labeled file the examples come from, when data is a single file
    split: str = "test"  # the queries' split of a prepare output
    text_field: str = "text"
    label_field: str = "label"
    k: int = 4
    max_queries: int = 100  # a seeded random sample of the split when it has more rows
    max_words: int = 40
    max_len: int = 256  # tokens per window (the model's context at most); a longer text is read in several
    window_overlap: int | None = None  # tokens of context a text's next window repeats (null: max_len // 4)
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.k >= 0, f"fewshot.k must be >= 0, got {self.k}")
        check(self.max_queries >= 1, f"fewshot.max_queries must be >= 1, got {self.max_queries}")
        check(self.max_words >= 1, f"fewshot.max_words must be >= 1, got {self.max_words}")
        check(self.max_len >= 8, f"fewshot.max_len must be >= 8, got {self.max_len}")
        check(self.window_overlap is None or 1 <= self.window_overlap < self.max_len,
              f"fewshot.window_overlap must be in [1, fewshot.max_len - 1 = {self.max_len - 1}] (tokens of context a "
              f"text's next window repeats), got {self.window_overlap}")
        check_seed(self.seed, "fewshot.seed")


@dataclass(frozen=True, kw_only=True)
class BiasEvalConfig:
    model: str  # causal LM directory or pretrain YAML
    pairs_path: str | None = None  # JSONL of {category, template with {}, stereotyped, anti}; default shipped


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    output_dir: str = "outputs/evaluate"
    name: str = "evaluate"
    lm: LMEvalConfig | None = None
    classification: ClassifyEvalConfig | None = None
    fewshot: FewshotEvalConfig | None = None
    bias: BiasEvalConfig | None = None
    actors: int = 2  # Ray Data actor pool size for batched scoring

    def __post_init__(self) -> None:
        check(any((self.lm, self.classification, self.fewshot, self.bias)),
              "evaluate: enable at least one of lm, classification, fewshot, bias")
        check(self.actors >= 1, f"actors must be >= 1, got {self.actors}")
        check_name(self.name)
        check_local(self.output_dir, "output_dir")
        for section in ("lm", "classification", "fewshot", "bias"):  # model directories (or YAMLs), lm.data
            for key in ("model", "data") if section == "lm" else ("model",):
                check_local(getattr(getattr(self, section), key, None), f"{section}.{key}")


def _causal_dir(spec: str, where: str | None = None) -> Path:
    """The model directory ``spec`` names; with ``where``, it must hold a causal LM."""
    from pipeline.finetune.finetune import resolve_model_dir
    from pipeline.model.build import require_causal

    path = resolve_model_dir(spec)
    check((path / "config.json").exists(), f"model {spec}: {path} is not a model directory (train it first)")
    if where:
        require_causal(path, where, "scoring continuations by log-likelihood")
    return path


def _labeled_files(spec: str) -> dict[str, str]:
    from pipeline.finetune.finetune import labeled_splits

    files = labeled_splits(spec)
    check(files != {}, f"{spec}: no labeled splits (a prepare output's sources need a label_field; a "
                          f"saved DatasetDict needs a non-empty split)")
    return files if files else {"test": spec}  # None: not a prepare output, a labeled file


def _eval_files(section: str, data: str, split: str, train_data: str | None, need_train: bool) -> tuple[str, str, str | None]:
    """A labeled section's files: (the split it reads, its file, the train file or None). ``data``
    is a prepare output or DatasetDict (its ``split``) or one labeled file (all of it, whatever
    ``split`` says); the train file is ``train_data`` if set, else the train split of ``data``."""
    files = _labeled_files(data)
    name = "test" if files == {"test": data} else split
    check(name in files, f"{section}.data {data}: no {split!r} split")
    train = train_data or files.get("train")
    check(not need_train or train is not None,
          f"{section}.data {data}: no train split for " + ("the examples" if section == "fewshot" else "the TF-IDF baseline")
          + f" (set {section}.train_data" + (", or classification.baseline: false)" if section == "classification" else ")"))
    return name, files[name], train


def _bias_pairs(b: BiasEvalConfig) -> list[dict]:
    """The counterfactual pairs, each checked to fit the model's context."""
    import transformers

    from pipeline.evaluate.bias import check_pairs_fit, load_pairs

    model_dir = str(_causal_dir(b.model))
    pairs = load_pairs(b.pairs_path)
    check_pairs_fit(transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
                    transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True), pairs)
    return pairs


def _read_split(path: str, text_field: str, label_field: str, extra: str | None, bad: list) -> list[dict]:
    return [{"idx": i, **r} for i, r in enumerate(read_labeled_rows(path, text_field, label_field, bad, extra))]


LM_TEXT_HINT = "; to score raw files (text, JSONL, CSV, Parquet, a directory), set lm.text_file instead"


def _lm_texts(c: LMEvalConfig) -> tuple[list[str], str, list[str], int]:
    """The documents of ``lm.text_file``, what they are ("lines" or "records"), the reasons
    of records that hold no usable text, and how many hidden files a directory or glob held (not
    read, as a prepare source leaves them out: ``.git``, ``.ipynb_checkpoints``). A plain text
    file is one document per non-empty line; JSONL / JSON / CSV / Parquet files and saved HF
    datasets are read as the prepare stage reads them, ``lm.text_field`` holding the text; so is a
    directory or a glob, every file in it as the prepare stage reads a directory source (a text
    file there is one document)."""
    from pipeline import schema as S
    from pipeline.data.sources import (SourceConfig, detect_format, expand_source, input_exists, no_visible_file,
                                       path_kind, read_file, text_lines, visible)

    path, kind = c.text_file, path_kind(c.text_file)  # a local path or a URI
    if kind == "missing" and input_exists(path):  # a glob's files, read as a prepare source reads a directory's
        kind = "dir"
    check(kind != "missing", f"lm.text_file not found: {path}")
    if kind in ("hf", "dir") or kind == "file" and detect_format(path) in ("jsonl", "json", "csv", "parquet"):
        tasks, hidden = visible(expand_source(SourceConfig(path=path, text_field=c.text_field)))
        check(bool(tasks), f"lm.text_file {path}: no file to read: {no_visible_file(hidden)}")
        records = [r for t in tasks for r in read_file(t, 1 << 30)]
        texts = [r[S.TEXT] for r in records if r.get(S.STATUS) is None]
        rejected = [r[S.REASON] for r in records if r.get(S.STATUS) is not None]
        check(bool(texts), f"lm.text_file {path}: no record with text in {c.text_field!r} (lm.text_field)"
                           + (f"; rejected: {sorted(set(rejected))}" if rejected else ""))
        return texts, "records", rejected, hidden
    lines = list(text_lines(path))
    texts = [t for _, t in lines if t is not None]
    rejected = ["invalid_utf8"] * (len(lines) - len(texts))
    check(bool(texts), f"lm.text_file {path}: no non-empty UTF-8 line to score")
    return texts, "lines", rejected, 0


def check_evaluate(cfg: EvaluateConfig) -> None:
    """Every model directory the config names exists and is of the kind its section uses (no
    cluster needed; run before any work)."""
    from pipeline.model.build import checkpoint_kind, require_classifier

    if cfg.lm is not None and cfg.lm.data is None:
        from pipeline.data.sources import input_exists

        check(input_exists(cfg.lm.text_file), f"lm.text_file not found: {cfg.lm.text_file}")
    elif cfg.lm is not None:
        from pipeline.train.data import load_manifest, resolve_prepared

        load_manifest(resolve_prepared(cfg.lm.data), "lm.data", LM_TEXT_HINT)
    for name, section in (("lm", cfg.lm), ("bias", cfg.bias)):  # causal or masked: both are scored
        if section is not None:
            path = _causal_dir(section.model)
            check(checkpoint_kind(path) != "classifier", f"{name}.model: {path} is a sequence classifier; "
                                                         f"{name} scores a language model (causal or masked)")
    if cfg.classification is not None:  # a model directory or a finetune YAML
        from pipeline.finetune.finetune import resolve_finetuned

        model_dir = resolve_finetuned(cfg.classification.model)
        check((model_dir / "config.json").exists(), f"classification.model: {model_dir} is not a model directory")
        require_classifier(model_dir, "classification.model")
        c = cfg.classification
        _eval_files("classification", c.data, c.split, c.train_data, c.baseline)
    if cfg.fewshot is not None:
        _causal_dir(cfg.fewshot.model, "fewshot.model")
        f = cfg.fewshot
        _eval_files("fewshot", f.data, f.split, f.train_data, True)
    if cfg.bias is not None:  # the pairs parse and fit the model's context
        _bias_pairs(cfg.bias)
    data_keys = {"lm.text_file": cfg.lm and cfg.lm.text_file,
                 "classification.data": cfg.classification and cfg.classification.data,
                 "classification.train_data": cfg.classification and cfg.classification.train_data,
                 "fewshot.data": cfg.fewshot and cfg.fewshot.data, "fewshot.train_data": cfg.fewshot and cfg.fewshot.train_data}
    from pipeline.data.sources import check_not_cache, check_one_split

    for key, value in data_keys.items():
        check_output_outside(cfg.output_dir, value or None, key)
        check_not_cache(value or None, key)
        if value and key != "lm.text_file":  # labeled data: one split's files
            check_one_split(value, key)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    import transformers

    out = Path(cfg.output_dir) / f"{cfg.name}-{config_hash({**to_dict(cfg), 'output_dir': None, 'actors': None})}"
    check_evaluate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"output_dir": str(out)}
    report = [f"# Evaluation: {cfg.name}", ""]

    if cfg.lm is not None:
        from pipeline.evaluate.ray_eval import score_shards
        from pipeline.train.data import check_same_tokenizer, load_manifest, resolve_prepared, shard_paths

        model_dir = _causal_dir(cfg.lm.model)
        if cfg.lm.data is not None:
            data_dir = resolve_prepared(cfg.lm.data)
            manifest = load_manifest(data_dir, "lm.data", LM_TEXT_HINT)
            files = shard_paths(data_dir, manifest, cfg.lm.split)
            check(bool(files), f"lm.data {data_dir}: no {cfg.lm.split} shards (lm.split; a test split holds labeled "
                               f"sources' documents, or those a source's own test split or split_field names)")
            check_same_tokenizer(data_dir, model_dir, "lm.data")
            from pipeline.model.build import context_length

            seq_len = manifest["tokens"]["seq_len"]
            ctx = context_length(transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True),
                                 default=seq_len)
            check(seq_len <= ctx, f"lm.data: its rows hold {seq_len} tokens, more than the model's context length "
                                  f"({ctx}); score a prepare output packed to at most {ctx} tokens, or lm.text_file")
            res = score_shards(files, str(model_dir), cfg.actors, max_rows=cfg.lm.max_rows, seed=cfg.lm.seed)
            scored = f"the {cfg.lm.split} shards of {data_dir}" + (f" (a seeded sample of {cfg.lm.max_rows} rows)" if cfg.lm.max_rows else "")
        else:
            from pipeline.train.data import sample_rows

            texts, unit, rejected, hidden = _lm_texts(cfg.lm)
            n_texts = len(texts)
            texts = sample_rows(texts, cfg.lm.max_rows, cfg.lm.seed)
            from pipeline.evaluate.lm import default_overlap
            from pipeline.model.build import checkpoint_kind

            overlap = cfg.lm.window_overlap or default_overlap(cfg.lm.max_len)
            scored = f"{len(texts)} of the {n_texts} {unit} of {cfg.lm.text_file}, each whole, in " + \
                (f"disjoint windows of up to {cfg.lm.max_len} tokens" if checkpoint_kind(model_dir) == "masked" else
                 f"windows of up to {cfg.lm.max_len} tokens ({overlap} tokens of context carried into the next)") + \
                (" (a seeded sample)" if len(texts) < n_texts else "") + \
                (f"; {len(rejected)} {unit if len(rejected) > 1 else unit[:-1]} rejected ({', '.join(sorted(set(rejected)))})" if rejected else "") + \
                (f"; {hidden} hidden file{'s' * (hidden > 1)} not read" if hidden else "")
            from pipeline.evaluate.ray_eval import score_texts

            res = score_texts(texts, str(model_dir), cfg.lm.max_len, cfg.actors, overlap=overlap)
        results["lm"] = {"model": str(model_dir), "scored": scored, **res}
        report += ["## Language modeling", "", f"- model: `{model_dir}`; scored: {scored}",
                   f"- loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}, bits/byte {res['bits_per_byte']:.4f} "
                   f"over {res['tokens']} tokens" if res["objective"] == "causal" else
                   f"- masked LM (BERT-style): loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f} over "
                   f"{res['tokens']} masked tokens (15% of each row, 80/10/10, as in training, seeded by the row)", ""]

    if cfg.classification is not None:
        results["classification"], lines = _eval_classification(cfg.classification, cfg.actors, out)
        report += lines

    if cfg.fewshot is not None:
        from pipeline.evaluate.classify import classification_metrics
        from pipeline.train.data import sample_rows
        from pipeline.evaluate.fewshot import CONTENT_FREE, decide, draw_shots
        from pipeline.evaluate.ray_eval import fewshot_scores

        f = cfg.fewshot
        model_dir = _causal_dir(f.model)
        split, split_path, train_path = _eval_files("fewshot", f.data, f.split, f.train_data, True)
        single = split_path == f.data  # a labeled file, not a prepare output: all its rows are queries
        bad: list = []  # each file's rejected rows once: the examples' file may be the queries' own
        test = _read_split(split_path, f.text_field, f.label_field, None, bad)
        train = [(r["text"], r["label"]) for r in
                 (test if train_path == split_path else _read_split(train_path, f.text_field, f.label_field, None, bad))]
        n_queries = len(test)
        test = sample_rows(test, f.max_queries, f.seed)
        check(bool(train) and bool(test), f"fewshot: no usable rows (train {len(train)}, queries {len(test)})")
        labels = sorted({y for _, y in train})
        queries = [r["text"] for r in test]
        shots = draw_shots(train, labels, f.k, f.seed, exclude=set(queries))  # never a query as its own example
        # the content-free query (calibration) is scored with the others, after the same examples
        *scores, bias = fewshot_scores(queries + [CONTENT_FREE], str(model_dir), shots, labels, f.max_len, f.max_words,
                                       cfg.actors)
        preds, calibrated = decide(scores, bias, labels)
        y_true = [r["label"] for r in test]  # a query label no example has counts as a miss
        all_labels = labels + sorted(set(y_true) - set(labels))
        m, c = classification_metrics(y_true, preds, all_labels), classification_metrics(y_true, calibrated, all_labels)
        results["fewshot"] = {"model": str(model_dir), "k": f.k, "examples": len(shots), "queries": len(test), "rejected_rows": len(bad), **m,
                              "calibrated": c}
        where = f.data if single else f"the {split} split"
        report += ["## Few-shot classification", "", f"- {len(shots)}-shot, {len(test)} queries from {where}"
                   + (" (a seeded sample)" if len(test) < n_queries else "") + f": accuracy {m['accuracy']:.3f}, "
                   f"macro-F1 {m['f1_macro']:.3f} (chance {1 / len(labels):.3f}); contextually calibrated "
                   f"(each label's score minus its score after a content-free query): accuracy {c['accuracy']:.3f}, "
                   f"macro-F1 {c['f1_macro']:.3f}", ""]

    if cfg.bias is not None:
        from pipeline.evaluate.bias import plot_gaps, summarize_probe
        from pipeline.evaluate.ray_eval import bias_gaps
        from pipeline.model.build import checkpoint_kind

        model_dir = _causal_dir(cfg.bias.model)
        masked = checkpoint_kind(model_dir) == "masked"
        pairs = _bias_pairs(cfg.bias)
        probe = summarize_probe(bias_gaps(pairs, str(model_dir), cfg.actors), [p["category"] for p in pairs])
        plot_gaps(probe["gaps"], out / "bias_gaps.png")
        results["bias"] = {"model": str(model_dir), **probe,
                           "scoring": "pseudo-log-likelihood" if masked else "log-likelihood",
                           "gap": "log p(shared tokens | stereotyped term) - log p(shared tokens | anti term); "
                                  "sentence: the whole sentences' log p difference"}
        sent = probe["sentence"]
        report += ["## Bias: counterfactual probe", "",
                   f"- {probe['n']} pairs: mean gap {probe['mean_gap']:.3f} nats, median {probe['median_gap']:.3f}, "
                   f"stereotyped variant preferred in {probe['share_stereotyped']:.0%}"
                   + (" (masked LM: pseudo-log-likelihoods)" if masked else ""),
                   "- the gap is the log-likelihood of the words both sentences share, given the stereotyped term "
                   "minus given the other (CrowS-Pairs); whole sentences, which also weigh how common each term "
                   f"is: mean gap {sent['mean_gap']:.3f}, median {sent['median_gap']:.3f}, stereotyped preferred in "
                   f"{sent['share_stereotyped']:.0%}", "",
                   "| category | mean gap | share stereotyped | whole-sentence mean gap | pairs |", "|---|---:|---:|---:|---:|",
                   *[f"| {c} | {v['mean_gap']:.3f} | {v['share_stereotyped']:.0%} | {sent['by_category'][c]['mean_gap']:.3f} "
                     f"| {v['n']} |" for c, v in probe["by_category"].items()],
                   "", "![bias gaps](bias_gaps.png)", ""]

    write_json(out / "results.json", results)
    (out / "report.md").write_text("\n".join(report))
    return results


def _same_file(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _fit_on(model_dir: Path, path: str) -> str | None:
    """The split of the classifier's own fine-tuning data that ``path`` is ("train", or "val",
    which chose its checkpoint), as its run's summary records it; None when neither, or where the
    model has no such record (a classifier from elsewhere)."""
    summary = model_dir.parent / "summary.json"
    try:
        files = json.loads(summary.read_text()).get("data_files") or {}
    except (OSError, ValueError):
        return None
    return next((s for s in ("train", "val") if isinstance(files.get(s), str) and _same_file(files[s], path)), None)


def _eval_classification(c: ClassifyEvalConfig, actors: int, out: Path) -> tuple[dict, list[str]]:
    from pipeline.evaluate.bias import sliced_metrics
    from pipeline.evaluate.classify import classification_metrics, paired_comparison, plot_confusion, tfidf_baseline
    from pipeline.evaluate.ray_eval import predict_dataset
    from pipeline.finetune.finetune import resolve_finetuned

    from pipeline.model.build import require_classifier

    model_dir = resolve_finetuned(c.model)
    check((model_dir / "config.json").exists(), f"classification.model: {model_dir} is not a model directory")
    require_classifier(model_dir, "classification.model")
    split, split_path, train_path = _eval_files("classification", c.data, c.split, c.train_data, c.baseline)
    bad: list = []
    rows = _read_split(split_path, c.text_field, c.label_field, c.group_field, bad)
    check(bool(rows), f"classification: the {split} split of {c.data} has no usable rows")
    preds = predict_dataset([{"idx": r["idx"], "text": r["text"]} for r in rows], str(model_dir), c.max_len, actors)
    y_true = [r["label"] for r in rows]
    cfg = json.loads((model_dir / "config.json").read_text())
    # the data's labels are class names (label_name); so are a classifier's, even one trained on
    # another spelling of the same classes (3.0 for 3)
    labels = [label_name(cfg["id2label"][str(i)]) for i in range(len(cfg["id2label"]))]
    preds = [label_name(p) for p in preds]
    unknown = sorted(set(y_true) - set(labels))  # never predicted: each such row is a miss, in every metric
    m = classification_metrics(y_true, preds, labels + unknown)
    plot_confusion(m["confusion_matrix"], m["labels"], out / "confusion_matrix.png", "fine-tuned classifier")
    res = {"model": str(model_dir), "split": split, "rejected_rows": len(bad), "labels_unknown_to_model": unknown, **m}
    n_unknown = sum(y in unknown for y in y_true)
    if fit_on := _fit_on(model_dir, split_path):  # a file the classifier was fit on scores it too well
        res["fit_on"] = fit_on
        logger.warning("classification: %s is the %s data of the classifier's own fine-tuning (%s), so its figures "
                       "are not a held-out measure: score a split it never saw (a prepare output's test split, or "
                       "classification.data set to another file)", split_path, fit_on, model_dir.parent / "summary.json")
    lines = ["## Classification", "", f"- model `{model_dir}`, {len(rows)} {split} examples"
             + (f"; labels the classifier was not trained on: {', '.join(unknown)} "
                f"({n_unknown} example{'s' * (n_unknown != 1)}, all counted as errors)" if unknown else "")
             + (f"; **not held out**: these rows are the {fit_on} data the classifier was fine-tuned with"
                if fit_on else ""),
             "", "| | accuracy | macro-F1 | weighted-F1 |", "|---|---:|---:|---:|",
             f"| fine-tuned classifier | {m['accuracy']:.3f} | {m['f1_macro']:.3f} | {m['f1_weighted']:.3f} |"]
    if c.baseline:
        train_bad: list = []  # the baseline's train file's rejected rows, counted apart from the split's
        train = rows if train_path == split_path else _read_split(train_path, c.text_field, c.label_field, None, train_bad)
        base_preds = tfidf_baseline([r["text"] for r in train], [r["label"] for r in train], [r["text"] for r in rows])
        b = classification_metrics(y_true, base_preds, m["labels"])
        res["baseline_tfidf_logreg"] = {**b, "train_rows": len(train), "train_rejected_rows": len(train_bad)}
        lines.append(f"| TF-IDF + LogisticRegression | {b['accuracy']:.3f} | {b['f1_macro']:.3f} | {b['f1_weighted']:.3f} |")
        # is the gap between the two more than the split's noise? (the same examples, paired)
        res["classifier_vs_baseline"] = vs = paired_comparison(y_true, preds, base_preds, m["labels"])
        # the same baseline on only the text the classifier reads (its window(s) of tokens)
        from types import SimpleNamespace

        import transformers

        from pipeline.evaluate.classify import read_spans, reading

        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        w = reading(SimpleNamespace(config=transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)),
                    c.max_len)
        same = tfidf_baseline(read_spans(tok, [r["text"] for r in train], w), [r["label"] for r in train],
                              read_spans(tok, [r["text"] for r in rows], w))
        sr = classification_metrics(y_true, same, m["labels"])
        what = f"{w.max_len} tokens" if w.windows == 1 else f"{w.windows} windows of {w.max_len} tokens"
        res["baseline_tfidf_logreg_same_reading"] = {"reading": what, **sr}
        lines.append(f"| TF-IDF + LogisticRegression on the classifier's reading ({what} per text) | {sr['accuracy']:.3f} | "
                     f"{sr['f1_macro']:.3f} | {sr['f1_weighted']:.3f} |")
        lo, hi = vs["f1_macro_diff_ci95"]
        lines += ["", f"- classifier against TF-IDF on the same {len(rows)} examples: {vs['only_a_correct']} right only by the "
                  f"classifier, {vs['only_b_correct']} only by TF-IDF (exact McNemar p = {vs['mcnemar_exact_p']:.2f}); "
                  f"macro-F1 difference {vs['f1_macro_diff']:+.3f}, 95% paired bootstrap interval {lo:+.3f} to {hi:+.3f}"]
    if c.group_field and all(r["group"] is None for r in rows):  # the default "source" in a file without it
        res["not_sliced"] = f"no row of the {split} split has a field {c.group_field!r} (group_field)"
        lines += ["", f"- not sliced: no row of the {split} split has a field `{c.group_field}` (group_field)"]
    elif c.group_field:  # rows without the field form their own group
        groups = [str(r["group"]) if r["group"] is not None else "(missing)" for r in rows]
        res["sliced"] = sliced_metrics(y_true, preds, groups, m["labels"])
        gap, groups = res["sliced"]["largest_gap"], res["sliced"]["per_group"]
        lines += ["", f"- sliced by `{c.group_field}`: largest accuracy gap {gap['gap']:.3f} ({gap['best']} vs {gap['worst']})"
                  if len(groups) > 1 else f"- sliced by `{c.group_field}`: one group only ({next(iter(groups))}), no gap to report"]
    lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    return res, lines
