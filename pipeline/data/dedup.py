"""Deduplication cores: exact (content hash) and fuzzy (MinHash-LSH candidates -> connected
components -> optional exact-Jaccard verification). Pure functions over Arrow tables and numpy
arrays; ``pipeline/data/ray_ops.py`` distributes them.

How each part scales with corpus size N (documents) on Ray Data:
- signatures and band keys: O(N) map tasks, streamed, no shared state;
- exact dedup and LSH buckets: a hash shuffle co-locates equal keys (content hashes, or
  ``bands`` keys per document) in one block, processed vectorised: O(N) work, O(N/P) per block;
- candidate edges: a star per bucket (smallest id -> others), O(duplicates), not O(N^2);
- connected components: union-find over the candidate edges in one process: memory
  O(documents that have a candidate), typically a small fraction of N; never the text;
- verification: a second shuffle, by component, of the shingle sets of candidate documents only;
- removal: each worker loads the table of fuzzy duplicates (O(duplicates) ids) once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.data.minhash import MinHashConfig, UnionFind, jaccard


@dataclass(frozen=True, kw_only=True)
class ExactDedupConfig:
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    fuzzy: MinHashConfig = field(default_factory=MinHashConfig)


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def exact_dedup_block(table: pa.Table) -> pa.Table:
    """Mark all but the smallest doc id of each content hash as an exact duplicate.

    The block must hold every row of each hash it contains (a hash shuffle guarantees that)."""
    if table.num_rows == 0:
        return table
    hashes = table.column(S.CONTENT_HASH).to_numpy(zero_copy_only=False)
    ids = table.column(S.DOC_ID).to_numpy(zero_copy_only=False)
    order = np.lexsort((ids, hashes))  # by hash, then id: the first of each run is the representative
    sorted_hashes = hashes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    rep_index = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rep_ids = ids[order][rep_index]
    table = table.take(pa.array(order))
    dup = pa.array(~first)
    status = pc.if_else(dup, S.STATUS_DROPPED, table.column(S.STATUS))
    reason = pc.if_else(dup, "exact_duplicate", table.column(S.REASON))
    representative = pc.if_else(dup, pa.array(rep_ids, pa.string()), table.column(S.REPRESENTATIVE))
    cluster = pc.if_else(dup, pa.array(sorted_hashes, pa.string()), table.column(S.CLUSTER_ID))
    excerpt = pc.if_else(dup, pc.utf8_slice_codeunits(table.column(S.TEXT), 0, 200), table.column(S.RAW_EXCERPT))
    text = pc.if_else(dup, pa.nulls(len(order), pa.large_string()), table.column(S.TEXT))
    for name, col in ((S.STATUS, status), (S.REASON, reason), (S.REPRESENTATIVE, representative),
                      (S.CLUSTER_ID, cluster), (S.RAW_EXCERPT, excerpt), (S.TEXT, text)):
        table = table.set_column(table.schema.get_field_index(name), name, col.cast(table.schema.field(name).type))
    return table


def bucket_edges(keys: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges (smallest id -> each other id) for every LSH bucket with two or more documents.

    The arrays must hold every row of each key they contain."""
    if len(keys) == 0:
        return np.array([], dtype=object), np.array([], dtype=object)
    order = np.lexsort((doc_ids, keys))
    k, d = keys[order], doc_ids[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    rep = d[np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))]
    mask = ~first & (d != rep)
    return rep[mask], d[mask]


def components_from_edges(edge_batches) -> dict[str, str]:
    """Connected components over candidate edges: doc id -> smallest doc id of its component."""
    uf = UnionFind()
    for a_ids, b_ids in edge_batches:
        for a, b in zip(a_ids, b_ids):
            uf.union(a, b)
    return uf.components()


def verify_component(
    doc_ids: list[str], shingles: list[np.ndarray], edges: list[tuple[str, str]], threshold: float
) -> list[dict]:
    """Keep the candidate edges whose exact Jaccard >= threshold, re-cluster on them and return a
    row per duplicate (every member except its cluster's smallest id)."""
    sets = dict(zip(doc_ids, shingles))
    uf = UnionFind()
    best: dict[str, float] = {}
    for a, b in edges:
        if a not in sets or b not in sets:
            continue
        sim = jaccard(sets[a], sets[b])
        if sim >= threshold:
            uf.union(a, b)
            best[a] = max(best.get(a, 0.0), sim)
            best[b] = max(best.get(b, 0.0), sim)
    return [
        {S.DOC_ID: doc, S.CLUSTER_ID: root, S.REPRESENTATIVE: root, S.SIMILARITY: best.get(doc)}
        for doc, root in sorted(uf.components().items())
        if doc != root
    ]
