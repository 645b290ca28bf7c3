"""Fine-tuning on Ray Train: ``sft`` (chat / instruction data, loss on assistant tokens only) or
``classification`` (a sequence-classification head), starting from a pretrained checkpoint
directory (ours or any local Hugging Face causal LM). Same loop and export as pretraining."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import check, check_local, check_name, check_output_outside, config_hash, to_dict, without_defaults
from pipeline.data.sources import hf_dict_splits
from pipeline.finetune.classify_data import encode_classification, end_with_eos, ensure_pad_token, read_labeled_rows
from pipeline.finetune.sft import OUR_TEMPLATES, load_chat_examples, prepare_chat_tokenizer, stop_at_turn_end, tokenize_chat
from pipeline.stamps import check_inputs
from pipeline.train.checkpoint import write_json
from pipeline.train.data import filler_row
from pipeline.train.loop import LATER_LOOP_KEYS, LoopConfig, OptimConfig
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig, equal_shares, filler_count
from pipeline.train.runner import reused_work, train_and_export

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FinetuneDataConfig:
    # sft: a JSONL of {"messages"} or {"prompt", "completion"}, or "chatterbot".
    # classification: a .jsonl/.csv/.parquet with text and label columns, or a prepare output
    # (directory or config YAML) whose labeled/{train,val,test}.parquet are used.
    train: str
    val: str | None = None  # default: the prepare output's val split, else val_fraction of train
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    val_fraction: float = 0.1
    max_seq_len: int = 256
    # classification: each text gives up to `windows` training rows of max_seq_len tokens (its
    # opening, then the following text, consecutive windows sharing window_overlap tokens), all
    # with its label; the classifier then reads texts the same way in evaluation and serving,
    # its windows' predictions pooled by window_pooling: the settings are saved in its config.json
    windows: int = 1
    window_overlap: int = 0
    # how a text's windows combine: "probs", the mean of their probabilities; "logits", the
    # softmax of the mean of their logits (their evidence adds up; BENCHMARKS.md compares them)
    window_pooling: Literal["probs", "logits"] = "probs"
    # classification, windows > 1: "window" trains on every window as an example of its own;
    # "article" on every text as a whole, its loss on its windows' pooled prediction (the
    # prediction evaluation and serving make; pipeline.finetune.article)
    window_training: Literal["window", "article"] = "window"
    # window_training article: each training step reads a random train_windows of a text's windows
    # (0: all of them), a cheaper step and a new subset each time a text is read; evaluation and serving
    # still read up to `windows` (pipeline.finetune.article.sample_windows; BENCHMARKS.md)
    train_windows: int = 0
    # sft: "auto" keeps a chat template the base's tokenizer already has (a chat model from
    # elsewhere keeps its format), else uses ours (sft.CHAT_TEMPLATE); "builtin": always ours
    chat_template: Literal["auto", "builtin"] = "auto"

    def __post_init__(self) -> None:
        check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        self.windowing  # checks max_seq_len, windows, window_overlap
        check(0 <= self.train_windows <= self.windows,
              f"data.train_windows must be in [0, data.windows = {self.windows}], got {self.train_windows}")
        check(self.train_windows == 0 or self.window_training == "article",
              "data.train_windows applies to data.window_training article only")

    @property
    def windowing(self):
        from pipeline.finetune.classify_data import Windowing

        return Windowing(self.max_seq_len, self.windows, self.window_overlap, self.window_pooling)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    task: Literal["sft", "classification"]
    base_model: str  # a Hugging Face model directory, or the pretrain config YAML that made one
    data: FinetuneDataConfig
    output_dir: str = "outputs/finetune"
    name: str = "finetune"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0))
    train: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfigCfg = field(default_factory=RunConfigCfg)
    # dropout while fine-tuning (residual, embedding and attention); null keeps the base model's
    dropout: float | None = None
    # classification with data.window_training article: the weight of an auxiliary next-token loss
    # on the same windows (GPT-1's fine-tuning objective; 0 turns it off), scored on a random
    # aux_lm_share of their positions (pipeline.finetune.article; BENCHMARKS.md measures both)
    aux_lm_weight: float = 0.0
    aux_lm_share: float = 1.0

    def __post_init__(self) -> None:
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) or null, got {self.dropout}")
        check_name(self.name)
        for key in ("output_dir", "base_model"):
            check_local(getattr(self, key), key)
        check(self.aux_lm_weight >= 0, f"aux_lm_weight must be >= 0, got {self.aux_lm_weight}")
        check(0 < self.aux_lm_share <= 1, f"aux_lm_share must be in (0, 1], got {self.aux_lm_share}")
        check(self.aux_lm_weight == 0 or (self.task == "classification" and self.data.window_training == "article"),
              "aux_lm_weight applies to task classification with data.window_training article only")
        check(not (self.task == "sft" and self.run.checkpoint_metric == "val_accuracy"),
              "run.checkpoint_metric val_accuracy applies to task classification only")
        if self.data.window_training == "article":
            check(self.task == "classification", "data.window_training article applies to task classification only")
            check(self.scaling.strategy == "ddp", "data.window_training article trains with scaling.strategy ddp "
                                                  "only (FSDP would shard the article wrapper, not the classifier)")
        # no key is silently ignored: each task's own data keys, refused for the other
        if self.task == "sft":
            d, given = self.data, []
            for key, default in (("text_field", "text"), ("label_field", "label"), ("windows", 1),
                                 ("window_overlap", 0), ("window_pooling", "probs"), ("test", None)):
                if getattr(d, key) != default:
                    given.append(f"data.{key}")
            check(not given, f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to task classification only "
                             f"(sft reads each record's messages, conversations, prompt + completion or instruction + "
                             f"output; its validation split is data.val or data.val_fraction of data.train)")
        else:
            check(self.data.chat_template == "auto", "data.chat_template applies to task sft only")


# config attributes that hold dropout probabilities, per architecture family
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "hidden_dropout", "dropout")


def dropout_overrides(base: Path, p: float | None) -> dict:
    """The from_pretrained kwargs setting every dropout probability the base config has to ``p``."""
    if p is None:
        return {}
    cfg = json.loads((base / "config.json").read_text())
    return {k: p for k in DROPOUT_KEYS if isinstance(cfg.get(k), (int, float))}


def resolve_model_dir(base: str) -> Path:
    """A model directory (absolute), or the exported model of the pretrain or finetune config YAML
    ``base`` names (a finetune config has a ``task``)."""
    if base.endswith((".yaml", ".yml")):
        from pipeline.config import load_config, load_yaml
        from pipeline.train.data import load_manifest, resolve_prepared
        from pipeline.train.pretrain import PretrainConfig

        if "task" in load_yaml(base):
            return resolve_finetuned(base).resolve()

        pre = load_config(PretrainConfig, base)
        return (pre.run_dir(load_manifest(resolve_prepared(pre.data))) / "model").resolve()
    # absolute: Ray Train workers run in their own working directories, and a relative path that
    # is not found there would be taken for a model hub id
    return Path(base).expanduser().resolve()


def labeled_splits(spec: str) -> dict[str, str] | None:
    """The labeled/{split}.parquet files of a prepare output, or the splits of a saved Hugging Face
    DatasetDict (validation named val), if ``spec`` names one."""
    from pipeline.train.data import resolve_prepared

    if (splits := hf_dict_splits(spec)) is not None:
        return splits
    if not (spec.endswith((".yaml", ".yml")) or Path(spec, "manifest.json").exists()):
        return None
    root = resolve_prepared(spec) / "labeled"
    return {s: str(root / f"{s}.parquet") for s in ("train", "val", "test") if (root / f"{s}.parquet").exists()}


def held_out_files(path: str) -> list[str]:
    """The files of a data directory or glob that name a validation or test split
    (``sources.named_split_files``): a fine-tuning run reads every file of ``data.train``."""
    from pipeline.data.sources import named_split_files

    named = named_split_files(path)
    return named.get("val", []) + named.get("test", [])


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _in_val(key: str, fraction: float) -> bool:
    return _hash01(key) < fraction


def split_off_val(pairs: list[tuple], fraction: float) -> tuple[list, list]:
    """(train, val) of labeled ``(text, label, ...)`` rows, stratified by label: ``fraction`` of
    each label's rows go to validation, as a stratified ``train_test_split`` does, so that every
    class is scored there in its share (a hash draw row by row can leave a class out of a small
    validation split altogether, and its accuracy then says nothing about it). A label gets
    ``floor(fraction * n)`` of its ``n`` rows, and the rest of the split's ``round(fraction * N)``
    rows (at least one) go one each to the labels with the largest remainders; a label keeps at least one row in
    train (a class seen only in validation could not be learned; logged when that leaves a label
    out of validation). Which rows of a label go is decided by a hash of each row's position and
    text: deterministic, whatever the file's order of classes."""
    import math

    by_label: dict = {}
    for i, p in enumerate(pairs):
        by_label.setdefault(p[1], []).append(i)
    quota = {y: fraction * len(idx) for y, idx in by_label.items()}
    take = {y: min(math.floor(q), len(by_label[y]) - 1) for y, q in quota.items()}
    total = max(1, round(fraction * len(pairs))) if len(pairs) > 1 else 0  # a fraction > 0 asks for a row at least
    spare = max(0, total - sum(take.values()))
    # the rest of the split goes to the largest remainders (ties in a fixed order, by a hash of the label)
    for y in sorted(quota, key=lambda y: (take[y] - quota[y], _hash01(f"label:{y}"))):
        if spare <= 0:
            break
        if take[y] < len(by_label[y]) - 1 and quota[y] > take[y]:
            take[y] += 1
            spare -= 1
    val_rows: set[int] = set()
    for y, idx in by_label.items():
        ranked = sorted(idx, key=lambda i: _hash01(f"{i}:{pairs[i][0][:64]}"))
        val_rows.update(ranked[:take[y]])
    kept = sorted(str(y) for y, idx in by_label.items() if take[y] == 0)
    if kept and val_rows:
        logger.info("data.val_fraction: %d label(s) have no validation row (too few rows for their share) and train only: %s",
                    len(kept), ", ".join(kept[:10]) + (" ..." if len(kept) > 10 else ""))
    return ([p for i, p in enumerate(pairs) if i not in val_rows], [p for i, p in enumerate(pairs) if i in val_rows])


def build_examples(cfg: FinetuneConfig, tok) -> tuple[dict[str, list[dict]], dict, list[dict]]:
    """Tokenized train/val(/test) rows, task info (labels), and the records rejected with reasons."""
    d = cfg.data
    bad: list[dict] = []
    if cfg.task == "sft":
        train_path, val_path = d.train, d.val
        splits = hf_dict_splits(d.train) if d.val is None else None
        if splits and "train" in splits and "val" in splits:  # a saved DatasetDict brings its own validation split
            train_path, val_path = splits["train"], splits["val"]
        convs = list(load_chat_examples(train_path, bad))
        check(bool(convs), f"data.train {d.train}: no usable conversation ({len(bad)} rejected)")
        rows = {"train": [], "val": []}

        def encode(conv: list[dict], where: str) -> dict | None:
            try:
                return tokenize_chat(conv, tok, d.max_seq_len)
            except ValueError as exc:  # a base's own template that does not render turn by turn, or no answer in the window
                bad.append({"where": where, "reason": str(exc)[:300]})
                return None

        for i, conv in enumerate(convs):
            split = "val" if val_path is None and _in_val(f"{i}:{conv[0]['content']}", d.val_fraction) else "train"
            if (row := encode(conv, f"{train_path}: conversation {i}")) is not None:
                rows[split].append(row)
        if val_path is not None:
            encoded = (encode(c, f"{val_path}: conversation {i}") for i, c in enumerate(load_chat_examples(val_path, bad)))
            rows["val"] = [r for r in encoded if r is not None]
        check(bool(rows["train"]), f"data.train {d.train}: no conversation could be encoded ({len(bad)} rejected; "
                                   f"first reason: {bad[0]['reason'] if bad else '-'})")
        return rows, {}, bad
    # a prepare output's or DatasetDict's splits, where data.train names one; data.val / data.test override
    files = {**(labeled_splits(d.train) or {"train": d.train}), **({"val": d.val} if d.val else {}),
             **({"test": d.test} if d.test else {})}
    check("train" in files, f"data.train {d.train}: no train split (it has {sorted(files) or 'none'})")
    data = {split: [(r["text"], r["label"], r["where"]) for r in read_labeled_rows(path, d.text_field, d.label_field, bad)]
            for split, path in files.items()}
    if "val" not in data:
        data["train"], data["val"] = split_off_val(data["train"], d.val_fraction)
    labels = sorted({y for _, y, _ in data["train"]})
    check(len(labels) >= 2, f"data.train: classification needs at least two labels, got {labels}")
    label2id = {y: i for i, y in enumerate(labels)}
    unknown = sorted({y for split in data.values() for _, y, _ in split} - set(labels))
    if unknown:  # a class without training rows cannot be learned: its rows are counted, not scored
        logger.warning("labels %s have rows only outside the train split: those rows are left out (rejected.json)",
                       unknown)
        for split in [s for s in ("val", "test") if s in data]:
            bad += [{"where": f"{where} ({split})",
                     "reason": f"label {y!r} has no row in the train split, so the classifier cannot learn it"}
                    for _, y, where in data[split] if y not in label2id]
            data[split] = [p for p in data[split] if p[1] in label2id]
    check(bool(data["val"]), "data.val: no row to validate on (none with a label of the train split)")
    from pipeline.finetune.article import encode_articles

    encode = encode_articles if d.window_training == "article" else encode_classification
    rows = {s: encode([t for t, _, _ in v], [y for _, y, _ in v], label2id, tok, d.windowing) for s, v in data.items() if v}
    return rows, {"label2id": label2id, "files": files}, bad


def setup_finetune(config: dict):
    import transformers

    from pipeline.model.build import load_pretrained, name_default_loss

    base = config["base_model"]
    tok = transformers.AutoTokenizer.from_pretrained(config["tokenizer_dir"], local_files_only=True)
    import torch

    torch.manual_seed(config["loop"]["seed"])
    dropout = config.get("dropout_overrides") or {}
    if config["task"] == "classification":
        label2id = config["label2id"]
        # a padding token added past the base's embeddings is set after they grow: Llama-style models
        # build their embedding with padding_idx = pad_token_id, which must lie inside it
        n_base = transformers.AutoConfig.from_pretrained(base, local_files_only=True).vocab_size
        pad = {"pad_token_id": tok.pad_token_id} if tok.pad_token_id < n_base else {}
        model = load_pretrained(
            transformers.AutoModelForSequenceClassification, base, num_labels=len(label2id), label2id=label2id,
            id2label={i: y for y, i in label2id.items()}, **pad, **dropout)
        from pipeline.finetune.classify_data import Windowing

        Windowing(*config["windowing"]).save_to(model.config)  # saved with every checkpoint
    else:
        model = name_default_loss(load_pretrained(transformers.AutoModelForCausalLM, base, **dropout))
    if len(tok) > model.get_input_embeddings().num_embeddings:  # padding or role tokens were added
        model.resize_token_embeddings(len(tok))
    if config["task"] == "sft":
        changed = stop_at_turn_end(model, tok)
        if changed:
            logger.info("finetune: the exported model stops generating where a turn ends: %s", "; ".join(changed))
    if config["task"] == "classification":
        model.config.pad_token_id = tok.pad_token_id  # the classifier reads each row's last non-padding token
        if config.get("window_training") == "article":
            from pipeline.finetune.article import ArticleClassifier

            model = ArticleClassifier(model, config.get("aux_lm_weight", 0.0), config.get("aux_lm_share", 1.0),
                                      config.get("train_windows", 0))
    return model, (lambda batch: batch), tok, 0.0


def finetune_run_dir(cfg: FinetuneConfig) -> Path:
    base = resolve_model_dir(cfg.base_model)
    key = {**to_dict(cfg), "base_model": str(base.resolve()), "output_dir": None, "scaling": None, "run": None}
    # keys added later: at their defaults a run keeps its directory
    key = without_defaults(key, {"aux_lm_weight": 0.0, "aux_lm_share": 1.0, "train": LATER_LOOP_KEYS,
                                 "data": {"train_windows": 0}})
    return Path(cfg.output_dir).resolve() / f"{cfg.name}-{config_hash(key)}"


def resolve_finetuned(spec: str) -> Path:
    """A model directory, or the finetune config YAML whose exported model to use."""
    if spec.endswith((".yaml", ".yml")):
        from pipeline.config import load_config

        return finetune_run_dir(load_config(FinetuneConfig, spec)) / "model"
    return Path(spec)


def check_finetune(cfg: FinetuneConfig) -> Path:
    """The base model directory, checked for the task (no cluster needed): it exists, SFT gets a
    causal LM, and ``data.max_seq_len`` fits its context."""
    import transformers

    from pipeline.model.build import ENCODER_TYPES, context_length, require_causal

    from pipeline.data.sources import check_not_cache

    for key in ("train", "val", "test"):
        check_output_outside(cfg.output_dir, getattr(cfg.data, key), f"data.{key}")
        check_not_cache(getattr(cfg.data, key), f"data.{key}")
    held_out = held_out_files(cfg.data.train)
    check(not held_out, f"data.train: {cfg.data.train} holds files named for held-out splits ({', '.join(held_out[:5])}"
                        f"{', ...' if len(held_out) > 5 else ''}), which training would read: give data.train its "
                        f"train files (a glob, such as {cfg.data.train.rstrip('/')}/**/train*), and data.val / "
                        f"data.test the others")
    base = resolve_model_dir(cfg.base_model)
    check((base / "config.json").exists(), f"base_model: {base} is not a Hugging Face model directory (train it first)")
    if cfg.task == "sft":
        require_causal(base, "base_model", "SFT (generating answers)")
    base_config = transformers.AutoConfig.from_pretrained(str(base), local_files_only=True)
    # a base with relative positions only (ALiBi) records no context length: max_seq_len is the limit
    ctx = context_length(base_config, default=cfg.data.max_seq_len)
    check(cfg.data.max_seq_len <= ctx, f"data.max_seq_len ({cfg.data.max_seq_len}) exceeds the base model's context "
                                       f"length ({ctx})")
    from pipeline.model.build import checkpoint_kind

    bidirectional = base_config.model_type in ENCODER_TYPES and not getattr(base_config, "is_decoder", False)
    check(cfg.aux_lm_weight == 0 or not bidirectional,
          "aux_lm_weight: a masked (bidirectional) base sees the next token, so a next-token loss teaches it nothing; "
          "use aux_lm_weight: 0")
    if cfg.task == "classification" and checkpoint_kind(base) == "masked" and cfg.optim.lr > 5e-4:
        logger.warning("finetune: optim.lr %.1e on a masked (BERT-style, post-norm) base: from the demo's masked "
                       "model 1e-3 stayed at chance where 3e-4 reached 0.91 validation accuracy (BENCHMARKS.md); "
                       "consider optim.lr=3e-4", cfg.optim.lr)
    return base


def _inputs(cfg: FinetuneConfig, base: Path) -> dict[str, str]:
    """The inputs a run reads, by config key: a prepare config stands for its output's manifest."""
    from pipeline.train.data import resolve_prepared

    d = cfg.data
    return {"base_model": str(base), **{
        f"data.{key}": str(resolve_prepared(spec) / "manifest.json") if spec.endswith((".yaml", ".yml")) else spec
        for key, spec in (("train", d.train), ("val", d.val), ("test", d.test)) if spec}}


def run_finetune(cfg: FinetuneConfig, callbacks: list | None = None, sweep_trial: bool = False) -> dict:
    import ray
    import transformers

    base = check_finetune(cfg)
    run_dir = finetune_run_dir(cfg)
    # a corrected data file, or a model re-exported to the base's path, since this run was made: said
    changed = check_inputs(run_dir, _inputs(cfg, base), "finetune", reused_work(run_dir), exclude=Path(cfg.output_dir))
    if (run_dir / "summary.json").exists():
        logger.info("finetune: %s is already complete (same config); not recomputing", run_dir)
        return {**json.loads((run_dir / "summary.json").read_text()), "cached": True,
                **({"inputs_changed": changed} if changed else {})}
    tok = transformers.AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if cfg.task == "sft":
        added = prepare_chat_tokenizer(tok, cfg.data.chat_template)
        if added:
            logger.info("finetune: added the role tokens %s to the tokenizer", added)
        logger.info("finetune: chat template: %s", "ours" if tok.chat_template in OUR_TEMPLATES else "the base's own")
    else:
        if end_with_eos(tok):
            logger.info("finetune: texts end with %s, where the classifier reads them", tok.eos_token)
        if ensure_pad_token(tok):
            logger.info("finetune: the tokenizer had no padding token apart from its EOS; added %s (id %d)",
                        tok.pad_token, tok.pad_token_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    rows, info, bad = build_examples(cfg, tok)
    write_json(run_dir / "rejected.json", {"count": len(bad), "records": bad[:1000]})
    if bad:
        logger.warning("finetune: %d record(s) rejected, each with its reason in %s; the first: %s", len(bad),
                       run_dir / "rejected.json", bad[0]["reason"])
    n_train, workers = len(rows.get("train", [])), cfg.scaling.num_workers
    check(n_train >= 1, "data.train: no training example")
    share = -(-n_train // workers)
    if share < cfg.train.batch_size:  # every epoch keeps its last, partial batch: each step is a whole share
        logger.info("data.train: %d examples, %d per worker, fewer than train.batch_size (%d): every step trains on a "
                    "worker's whole share", n_train, share, cfg.train.batch_size)
    if "test" in rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: v.tolist() if hasattr(v, "tolist") else v for k, v in r.items()}
                                             for r in rows["test"]]), run_dir / "test_encoded.parquet")
    import random

    # files often come sorted by id or label: the training stream is shuffled, and so is validation,
    # whose first `train.eval_batches` batches per worker are what an evaluation scores
    for split in ("train", "val"):
        random.Random(cfg.train.seed).shuffle(rows.get(split, []))
    # filler rows (no loss) at the end make each split divide among the workers: Ray Train's equal
    # split would leave the remainder out
    datasets = {s: ray.data.from_items(rows[s] + [filler_row(rows[s][0])] * filler_count(len(rows[s]), workers))
                for s in ("train", "val") if rows.get(s)}
    run_cfg = cfg.run
    if cfg.task == "classification" and run_cfg.checkpoint_metric is None:
        run_cfg = dataclasses.replace(run_cfg, checkpoint_metric="val_accuracy")
    config = {"optim": to_dict(cfg.optim), "loop": to_dict(cfg.train), "scaling": to_dict(cfg.scaling),
              "run": to_dict(run_cfg), "dropout_overrides": dropout_overrides(base, cfg.dropout), "task": cfg.task, "base_model": str(base), "tokenizer_dir": str(tok_dir),
              "label2id": info.get("label2id"),
              "windowing": list(dataclasses.astuple(cfg.data.windowing)), "window_training": cfg.data.window_training,
              "train_windows": cfg.data.train_windows, "aux_lm_weight": cfg.aux_lm_weight, "aux_lm_share": cfg.aux_lm_share}
    extra = {"task": cfg.task, "base_model": str(base), "label2id": info.get("label2id"),
             "examples": {s: len(v) for s, v in rows.items()}, "rejected": len(bad), "data_files": info.get("files"),
             "equal_shares": equal_shares({s: len(rows[s]) for s in datasets}, workers),
             "config": to_dict(cfg)}
    return train_and_export(run_dir, datasets, setup_finetune, config, cfg.scaling, run_cfg, None, extra, callbacks,
                            sweep_trial)
