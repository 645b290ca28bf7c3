"""Labeled texts for sequence classification: JSONL, CSV or Parquet files with a text and a label
column, or a prepare output's ``labeled/`` split files (BBC topics in the demo)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def read_labeled(path: str, text_field: str, label_field: str, bad: list[dict]) -> list[tuple[str, str]]:
    """(text, label) pairs; rows with a missing/non-string text or a missing label go to ``bad``."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file not found: {path}")
    if p.suffix == ".parquet":
        table = pq.read_table(p)
    elif p.suffix == ".csv":
        table = pcsv.read_csv(p)
    elif p.suffix in (".jsonl", ".json"):
        try:
            table = pjson.read_json(p)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: not valid JSON lines ({exc})") from None
    else:
        raise ValueError(f"{path}: unsupported extension (use .jsonl, .csv or .parquet)")
    for col in (text_field, label_field):
        if col not in table.column_names:
            raise ValueError(f"{path}: no column {col!r} (columns: {table.column_names})")
    out = []
    for i, (text, label) in enumerate(zip(table.column(text_field).to_pylist(), table.column(label_field).to_pylist())):
        if not isinstance(text, str) or not text.strip():
            bad.append({"where": f"{path}:{i}", "reason": "missing or non-string text"})
        elif label is None or not str(label).strip():
            bad.append({"where": f"{path}:{i}", "reason": "missing label"})
        else:
            out.append((text, str(label)))
    return out


def end_with_eos(tok) -> bool:
    """Make ``tok`` append its end-of-text token to every encoded text, when it adds no special
    tokens of its own (our BPE tokenizers, GPT-2's). A causal LM classifies from its last token:
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
        return bool(with_special) and with_special[-1] == tok.eos_token_id
    backend = getattr(tok, "_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no post-processor to set
        return False
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, tok.eos_token_id)])
    return tok(probe)["input_ids"] == plain + [tok.eos_token_id]


def encode_classification(texts: list[str], labels: list[str], label2id: dict[str, int], tok, max_len: int) -> list[dict]:
    enc = tok(texts, truncation=True, max_length=max_len, padding="max_length")
    return [{"input_ids": ids, "attention_mask": mask, "labels": label2id[y]}
            for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
