"""Labeled texts for sequence classification: JSONL, JSON, CSV or Parquet files or saved Hugging
Face datasets with a text and a label column, or a prepare output's ``labeled/`` split files (BBC
topics in the demo)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.config import check

_INTEGRAL = re.compile(r"[+-]?\d+\.0*")


def label_name(value) -> str:
    """A label value's class name, the same however a file spells the class: an integral number
    is its integer (``3``, ``3.0`` and the CSV text ``"3.0"`` are class ``"3"``: a numeric column
    with a missing value becomes float in pandas and Parquet, so a train file says 3.0 where a
    test file says 3), a boolean is ``true`` / ``false`` as JSON writes it, and a string loses the
    spaces around it (``"text, label"`` CSV headers and rows)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text.split(".")[0])) if _INTEGRAL.fullmatch(text) else text


def read_labeled(path: str, text_field: str, label_field: str, bad: list[dict]) -> list[tuple[str, str]]:
    """(text, label) pairs; rows with a missing/non-string text or a missing label, and JSONL
    lines that do not parse, go to ``bad``. A dotted field name reaches into nested objects or
    struct columns (``meta.topic``), as in the prepare stage's sources."""
    return [(r["text"], r["label"]) for r in read_labeled_rows(path, text_field, label_field, bad)]


LABELED_FORMATS = ("jsonl", "json", "csv", "parquet")


def _located_rows(path: str, label_field: str, bad: list[dict]):
    """``(where, row)`` over a labeled file, ``where`` the row's place in it as the prepare stage
    names places: ``path:LINE`` in a JSON Lines file, ``path[i]`` in a JSON array, ``path: record
    N`` (from 1, the header not counted) in a CSV, ``path: row i`` (from 0) in Parquet,
    ``path: [split ]row i`` in a saved dataset (a ``ClassLabel`` ``label_field`` as its class names). A CSV record with more values than its header has
    columns goes to ``bad``: which value belongs to which column is unknown. A directory or glob
    is read file by file, in path order; a file of another kind there goes to ``bad``."""
    import csv

    import pyarrow.parquet as pq

    from pipeline.data.sources import _arrow_rows, _open, csv_rows, data_files, detect_format, hf_rows, json_records, path_kind

    files = data_files(path, LABELED_FORMATS, "a labeled data file (.jsonl, .json, .csv, .tsv or .parquet)", bad)
    if files is not None:  # a directory or glob of such files (shards), file by file
        for file in files:
            yield from _located_rows(file, label_field, bad)
        return
    kind, fmt = path_kind(path), detect_format(path)  # a local path or a URI; compressed files too
    if kind not in ("file", "hf"):
        raise ValueError(f"data file not found: {path}")
    if kind == "hf":  # a saved HF dataset (of a DatasetDict, every split: finetune and evaluate pick one through labeled_splits)
        for where, row in hf_rows(path, label_field):  # "split/i" in a DatasetDict, "i" in one split
            split, _, i = where.rpartition("/")
            yield f"{path}: {split + ' ' if split else ''}row {i}", row
    elif fmt == "parquet":
        with _open(path) as f:
            batches = pq.ParquetFile(f).iter_batches(batch_size=1024)
            yield from ((f"{path}: row {where}", row) for where, row in _arrow_rows(batches))
    elif fmt == "csv":
        try:
            for n, row in enumerate(csv_rows(path), 1):
                if None in row:
                    bad.append({"where": f"{path}: record {n}", "reason": f"{len(row[None])} more value(s) than the "
                                                                          f"header has columns"})
                else:
                    yield f"{path}: record {n}", row
        except csv.Error as exc:
            raise ValueError(f"{path}: not a readable CSV file ({exc})") from exc
    elif fmt in ("jsonl", "json"):
        for where, obj in json_records(path, bad, (label_field,)):
            if isinstance(obj, dict):
                yield where, obj
            else:
                bad.append({"where": where, "reason": f"a JSON {type(obj).__name__}, not an object"})
    else:
        raise ValueError(f"{path}: unsupported extension (use .jsonl, .json, .csv, .tsv or .parquet, or a directory "
                         f"written by datasets.save_to_disk)")


def read_labeled_rows(path: str, text_field: str, label_field: str, bad: list[dict],
                      group_field: str | None = None) -> list[dict]:
    """``read_labeled``'s rows as ``{"text", "label", "group", "where"}``; ``group`` is
    ``group_field``'s value (None without one, or where a row lacks it), ``where`` the row's place
    in the file (``_located_rows``), which ``bad`` entries name too."""
    from pipeline.data.sources import MISSING, field_value, valid_text

    rows = list(_located_rows(path, label_field, bad))
    for col in (text_field, label_field):
        if rows and all(field_value(r, col) is MISSING for _, r in rows):
            raise ValueError(f"{path}: no column {col!r} (columns: {sorted(rows[0][1])})")
    out = []
    for where, row in rows:
        text, label = field_value(row, text_field), field_value(row, label_field)
        if not isinstance(text, str) or not text.strip():
            bad.append({"where": where, "reason": "missing or non-string text"})
        elif not valid_text(text) or isinstance(label, str) and not valid_text(label):  # undecodable CSV bytes
            bad.append({"where": where, "reason": "text or label holds bytes that are not valid UTF-8 (save the "
                                                  "file as UTF-8)"})
        elif label is MISSING or label is None or label != label or not str(label).strip():  # label != label: NaN
            bad.append({"where": where, "reason": "missing label"})
        elif isinstance(label, (list, dict, bytes)):
            bad.append({"where": where, "reason": f"the label is a {type(label).__name__}, not one value "
                                                  f"(a string or a number)"})
        else:
            group = field_value(row, group_field) if group_field else None
            out.append({"text": text, "label": label_name(label), "group": None if group is MISSING else group,
                        "where": where})
    return out


def end_with_eos(tok) -> bool:
    """Make ``tok`` append its end-of-text token to every encoded text, when it adds no special
    tokens of its own (our BPE tokenizers, GPT-2's) or only a BOS (Llama's, Mistral's:
    ``_bos_template_with_eos``). A causal LM classifies from its last token:
    without an end marker that is whatever word truncation cut at; with one, the model learns to
    summarize the text at a fixed token. The change is in the tokenizer's post-processor, so it is
    saved with the classifier and every later encoding (evaluation, serving, any HF user) matches.
    Returns whether the tokenizer now ends texts with EOS."""
    eos = tok.eos_token
    if eos is None:
        return False
    probe = "a b"
    with_special, plain = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    if with_special != plain:  # the tokenizer has its own template (BERT's [CLS]/[SEP], Llama's BOS)
        if bool(with_special) and with_special[-1] == tok.eos_token_id:
            return True
        return _bos_template_with_eos(tok, probe, plain, with_special)
    backend = getattr(tok, "_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no post-processor to set
        return False
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, tok.eos_token_id)])
    return tok(probe)["input_ids"] == plain + [tok.eos_token_id]


def _bos_template_with_eos(tok, probe: str, plain: list[int], with_special: list[int]) -> bool:
    """A template that only prepends BOS (Llama's, Mistral's) gets EOS appended too, through the
    tokenizer's ``add_bos_token`` / ``add_eos_token`` flags: transformers rebuilds the template
    from them, and saves them with the tokenizer, so every later load encodes the same. Any other
    template (BERT's [CLS] ... [SEP]: its classifier reads [CLS]) is left as it is; so is a
    tokenizer the flags do not turn into BOS + text + EOS (its template is restored)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is None or bos == eos or with_special != [bos] + plain or not hasattr(tok, "add_eos_token"):
        return False
    backend = getattr(tok, "_tokenizer", None)
    saved = backend.post_processor if backend is not None else None
    flags = {name: getattr(tok, name) for name in ("add_bos_token", "add_eos_token") if hasattr(tok, name)}
    try:
        tok.add_bos_token, tok.add_eos_token = True, True
        if tok(probe)["input_ids"] == [bos] + plain + [eos]:
            return True
    except (AttributeError, TypeError, ValueError):  # a tokenizer whose flags are read-only or rebuild nothing
        pass
    for name, value in flags.items():
        setattr(tok, name, value)
    if saved is not None:
        backend.post_processor = saved
    return False


def ensure_pad_token(tok) -> bool:
    """Pad on the right, with a padding token of the tokenizer's own: GPT-2's and Llama's
    tokenizers ship without one. A sequence classifier reads the last token that is not padding,
    so the usual workaround, padding with EOS, would hide the EOS that ends every text: a base
    that pads with its EOS (many published ones do, Qwen2's among them) gets a padding token of
    its own too. Returns whether a token was added (the model's embeddings must then cover its
    id); the setting is saved with the classifier's tokenizer."""
    tok.padding_side = "right"  # positions of a causal model's tokens then start at 0 in every row
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return False
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return True


POOLINGS = ("logits", "probs")


@dataclass(frozen=True)
class Windowing:
    """How a classifier reads a text: up to ``windows`` windows of ``max_len`` tokens (special
    tokens included) from its start, consecutive windows sharing ``overlap`` tokens. One window
    is the opening only; several let a classifier with a short context read a long document.
    ``pooling`` is how the windows' predictions combine into the text's (``pool_windows``):
    ``logits``, the softmax of the mean of their logits, or ``probs``, the mean of their
    probabilities (a model saved without the setting was read that way)."""

    max_len: int
    windows: int = 1
    overlap: int = 0
    pooling: str = "probs"

    def __post_init__(self) -> None:
        check(self.max_len >= 8, f"data.max_seq_len must be >= 8, got {self.max_len}")
        check(self.windows >= 1, f"data.windows must be >= 1, got {self.windows}")
        check(0 <= self.overlap < self.max_len // 2,
              f"data.window_overlap must be in [0, max_seq_len / 2), got {self.overlap}")
        check(self.pooling in POOLINGS, f"data.window_pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def save_to(self, config) -> None:
        """Recorded in the model's config.json, so evaluation and serving read texts the same way."""
        config.window_tokens, config.windows, config.window_overlap = self.max_len, self.windows, self.overlap
        config.window_pooling = self.pooling

    @classmethod
    def of(cls, config, default_max_len: int) -> "Windowing":
        """The reading saved with a classifier; one window of ``default_max_len`` if none was."""
        pooling = getattr(config, "window_pooling", None) or "probs"
        check(pooling in POOLINGS, f"the classifier's config.json has window_pooling {pooling!r}, "
                                   f"not one of {', '.join(POOLINGS)}")
        return cls(getattr(config, "window_tokens", None) or default_max_len, getattr(config, "windows", None) or 1,
                   getattr(config, "window_overlap", None) or 0, pooling)


def pool_windows(logits: torch.Tensor, owner: torch.Tensor, texts: int, pooling: str) -> torch.Tensor:
    """(texts, labels) log-probabilities of texts from the logits of their windows (``owner``:
    each window's text). ``logits``: the log-softmax of the mean of a text's window logits, so the
    evidence of its windows adds up, as a linear bag-of-words model sums its words' weights;
    ``probs``: the log of the mean of the windows' probabilities. A text without a window gets
    uniform probabilities (``logits``) or none (``probs``); differentiable either way."""
    import torch

    logits = logits.float()
    count = torch.bincount(owner, minlength=texts).clamp_min(1).unsqueeze(1).to(logits.dtype)
    zeros = torch.zeros(texts, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    if pooling == "logits":
        return (zeros.index_add(0, owner, logits) / count).log_softmax(-1)
    probs = zeros.index_add(0, owner, logits.softmax(-1)) / count
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def encode_windows(tok, texts: list[str], w: Windowing, padding: str | bool = True, **kwargs) -> tuple[dict, list[int]]:
    """Token windows of ``texts`` (each ending with the tokenizer's special tokens) and, per
    window, the index of its text."""
    if w.windows == 1:
        enc = tok(texts, truncation=True, max_length=w.max_len, padding=padding, **kwargs)
        return dict(enc), list(range(len(texts)))
    if not getattr(tok, "is_fast", False):
        raise ValueError("data.windows > 1 needs a fast (Rust) tokenizer: this one cannot split a text into "
                         "overlapping windows; use windows: 1 or a tokenizer.json tokenizer")
    enc = tok(texts, truncation=True, max_length=w.max_len, stride=w.overlap, return_overflowing_tokens=True,
              padding=padding, **kwargs)
    mapping = [int(i) for i in enc.pop("overflow_to_sample_mapping")]
    seen: dict[int, int] = {}
    keep = []
    for j, src in enumerate(mapping):
        seen[src] = seen.get(src, 0) + 1
        if seen[src] <= w.windows:
            keep.append(j)
    out = {k: (v[keep] if hasattr(v, "shape") else [v[j] for j in keep]) for k, v in enc.items()}
    return out, [mapping[j] for j in keep]


def encode_classification(texts: list[str], labels: list[str], label2id: dict[str, int], tok,
                          window: Windowing | int) -> list[dict]:
    """Training rows: one per window, each with its text's label."""
    w = window if isinstance(window, Windowing) else Windowing(window)
    enc, source = encode_windows(tok, texts, w, padding="max_length")
    return [{"input_ids": ids, "attention_mask": mask, "labels": label2id[labels[src]]}
            for ids, mask, src in zip(enc["input_ids"], enc["attention_mask"], source)]
