"""Writing packed token shards: tokenize a group of documents, pack them into ``seq_len`` rows and
write one Parquet shard (temporary name, then an atomic rename). Returns the shard's metadata for
the manifest. Pure Python; the Ray Data wrapper maps it over groups of documents."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.data.packing import pack
from pipeline.data.tokenizer import load_backend

SHARD_SCHEMA = pa.schema([(S.INPUT_IDS, pa.list_(pa.int32()))])


def write_packed_shard(
    doc_ids: list[str], texts: list[str], sources: list[str], tokenizer_dir: str, seq_len: int, out_dir: str,
    bos_id: int | None = None,
) -> dict:
    """``bos_id``: each document opens with it (``document_bos``: a tokenizer that opens every text
    with BOS)."""
    tok, eos_id = load_backend(tokenizer_dir)
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") \
        else tok.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    rows, remainder = pack(ids, eos_id, seq_len, bos_id)
    per_source: Counter[str] = Counter()
    for src, doc in zip(sources, ids):
        per_source[src] += len(doc) + (1 if bos_id is None else 2)
    flat = pa.array(rows.reshape(-1), pa.int32())
    offsets = pa.array([i * seq_len for i in range(len(rows) + 1)], pa.int32())
    table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, flat)], schema=SHARD_SCHEMA)
    # Content-addressed name: a retried task rewrites the same file instead of adding a duplicate.
    digest = hashlib.sha256("\x00".join(doc_ids).encode()).hexdigest()[:16]
    out = Path(out_dir) / f"part-{digest}.parquet"
    if len(rows):  # a group shorter than one sequence only contributes its remainder
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    return {
        "path": str(out) if len(rows) else "", "rows": len(rows), "num_docs": len(texts), "first_doc_id": min(doc_ids) if doc_ids else "",
        "doc_tokens": int(sum(per_source.values())), "packed_tokens": int(rows.size), "remainder": int(remainder),
        "source_tokens": dict(per_source),
    }
