"""Packing: token ids of documents, each followed by the end-of-text id (and opened by the
beginning-of-text id where the tokenizer opens every text with one, as Llama's and Mistral's do),
concatenated and cut into rows of exactly ``seq_len`` tokens (GPT-2/nanoGPT style, no padding).

Accounting: ``sum(len(doc) + 1) == rows * seq_len + remainder`` (``+ 2`` per document with BOS). The remainder (< seq_len) is
the tail of each packing group (one group per shard) and is not written; it is reported in the
manifest so that no token goes missing unaccounted.
"""

from __future__ import annotations

import numpy as np


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, bos_id: int | None = None) -> tuple[np.ndarray, int]:
    """Returns (rows[int32, (n, seq_len)], remainder)."""
    assert seq_len > 0, f"seq_len must be > 0, got {seq_len}"
    extra = 1 if bos_id is None else 2
    total = sum(len(t) + extra for t in token_lists)
    flat = np.empty(total, dtype=np.int32)
    pos = 0
    for ids in token_lists:
        if bos_id is not None:
            flat[pos] = bos_id
            pos += 1
        n = len(ids)
        flat[pos : pos + n] = ids
        flat[pos + n] = eos_id
        pos += n + 1
    num_rows = total // seq_len
    return flat[: num_rows * seq_len].reshape(num_rows, seq_len), total - num_rows * seq_len
