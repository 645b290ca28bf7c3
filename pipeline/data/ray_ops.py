"""Ray Data wrappers: the only module of the data stage that touches Ray. Each function maps a
pure core (``clean``, ``dedup``, ``minhash``, ``shards``, ...) over a dataset."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import config_hash
from pipeline.data.clean import CleanConfig, DocumentCleaner
from pipeline.data.decontam import NgramIndex
from pipeline.data.dedup import bucket_edges, content_hash, exact_dedup_block, verify_component
from pipeline.data.minhash import MinHashConfig, MinHasher, band_keys, shingle_hashes
from pipeline.data.shards import write_packed_shard
from pipeline.data.sources import read_file
from pipeline.data.split import SplitConfig, split_for, without

logger = logging.getLogger(__name__)
ROWS_PER_OUTPUT = 1000

# ---------------------------------------------------------------- per-process caches (one load per worker)
_cleaners: dict[str, DocumentCleaner] = {}


def _cleaner(cfg: CleanConfig) -> DocumentCleaner:
    key = config_hash(cfg)
    if key not in _cleaners:
        _cleaners[key] = DocumentCleaner(cfg)
    return _cleaners[key]


@lru_cache(maxsize=2)
def _fuzzy_duplicates(path: str) -> dict[str, tuple[str, str, float | None]]:
    if not path:
        return {}
    t = pq.read_table(path).to_pydict()
    return {d: (c, r, s) for d, c, r, s in zip(t[S.DOC_ID], t[S.CLUSTER_ID], t[S.REPRESENTATIVE], t[S.SIMILARITY])}


@lru_cache(maxsize=2)
def _components(path: str) -> dict[str, str]:
    t = pq.read_table(path).to_pydict()
    return dict(zip(t["doc_id"], t["component"]))


@lru_cache(maxsize=2)
def _component_edges(path: str) -> dict[str, list[tuple[str, str]]]:
    t = pq.read_table(path).to_pydict()
    out: dict[str, list[tuple[str, str]]] = {}
    for comp, a, b in zip(t["component"], t["a"], t["b"]):
        out.setdefault(comp, []).append((a, b))
    return out


@lru_cache(maxsize=2)
def _ngram_index(path: str, n: int) -> NgramIndex:
    return NgramIndex(np.load(path), n)


# ---------------------------------------------------------------- 1) read + clean
def read_and_clean(batch: pa.Table, cfg: CleanConfig, max_doc_bytes: int) -> Iterator[pa.Table]:
    """Rows of file bundles -> cleaned document rows (kept, dropped or quarantined)."""
    cleaner = _cleaner(cfg)
    rows: list[dict] = []
    for bundle in batch.column("bundle").to_pylist():
        for task in json.loads(bundle):
            for record in read_file(task, max_doc_bytes):
                rows.append(cleaner.clean(record))
                if len(rows) >= ROWS_PER_OUTPUT:
                    yield S.docs_table(rows)
                    rows = []
    if rows:
        yield S.docs_table(rows)


# ---------------------------------------------------------------- 2) exact dedup
def _with_content_hash(batch: pa.Table) -> pa.Table:
    hashes = [content_hash(t) for t in batch.column(S.TEXT).to_pylist()]
    return batch.append_column(S.CONTENT_HASH, pa.array(hashes, pa.string()))


def _exact_block(batch: pa.Table) -> pa.Table:
    return exact_dedup_block(batch).drop_columns([S.CONTENT_HASH])


def group_by_key(ds, key: str, num_partitions: int, fn, **kwargs):
    """Hash-shuffle so every row of a key lands in one sorted block, then run ``fn`` per block
    (the same guarantee Ray Data's own ``groupby().map_groups`` relies on), vectorised."""
    return ds.repartition(num_partitions, keys=[key], sort=True).map_batches(
        fn, batch_size=None, batch_format="pyarrow", **kwargs
    )


def exact_dedup(ds, num_partitions: int):
    return group_by_key(ds.map_batches(_with_content_hash, batch_format="pyarrow"), S.CONTENT_HASH, num_partitions, _exact_block)


# ---------------------------------------------------------------- 3) fuzzy dedup
@lru_cache(maxsize=2)
def _hasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def _band_rows(batch: pa.Table, cfg: MinHashConfig) -> pa.Table:
    hasher = _hasher(cfg.num_perm, cfg.seed)
    cache: dict[str, int] = {}
    keys: list[int] = []
    ids: list[str] = []
    for doc_id, text in zip(batch.column(S.DOC_ID).to_pylist(), batch.column(S.TEXT).to_pylist()):
        sig = hasher.signature(shingle_hashes(text, cfg.shingle_size, cache, unique=False))
        keys.extend(band_keys(sig, cfg.bands, cfg.rows))
        ids.extend([doc_id] * cfg.bands)
    return pa.table({"band_key": pa.array(keys, pa.int64()), S.DOC_ID: pa.array(ids, pa.string())})


def _bucket_edges(batch: pa.Table) -> pa.Table:
    a, b = bucket_edges(batch.column("band_key").to_numpy(), batch.column(S.DOC_ID).to_numpy(zero_copy_only=False))
    table = pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string())})
    if table.num_rows:
        table = table.group_by(["a", "b"]).aggregate([])  # the same pair from several bands
    return table


def candidate_edges(docs, cfg: MinHashConfig, num_partitions: int):
    bands = docs.select_columns([S.DOC_ID, S.TEXT]).map_batches(_band_rows, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
    return group_by_key(bands, "band_key", num_partitions, _bucket_edges)


def _candidate_shingles(batch: pa.Table, components_path: str, shingle_size: int) -> pa.Table:
    comps = _components(components_path)
    out_comp, out_ids, out_sh = [], [], []
    cache: dict[str, int] = {}
    for doc_id, text in zip(batch.column(S.DOC_ID).to_pylist(), batch.column(S.TEXT).to_pylist()):
        comp = comps.get(doc_id)
        if comp is not None:
            out_comp.append(comp)
            out_ids.append(doc_id)
            out_sh.append(shingle_hashes(text, shingle_size, cache).astype(np.uint32).tobytes())
    return pa.table({"component": pa.array(out_comp, pa.string()), S.DOC_ID: pa.array(out_ids, pa.string()),
                     "shingles": pa.array(out_sh, pa.large_binary())})


def _verify_block(batch: pa.Table, edges_path: str, threshold: float) -> pa.Table:
    edges = _component_edges(edges_path)
    rows: list[dict] = []
    data = batch.to_pydict()
    members: dict[str, tuple[list, list]] = {}
    for comp, doc_id, sh in zip(data["component"], data[S.DOC_ID], data["shingles"]):
        ids, sets = members.setdefault(comp, ([], []))
        ids.append(doc_id)
        sets.append(np.frombuffer(sh, dtype=np.uint32))
    for comp, (ids, sets) in members.items():
        rows.extend(verify_component(ids, sets, edges.get(comp, []), threshold))
    return pa.Table.from_pylist(rows, schema=FUZZY_SCHEMA)


FUZZY_SCHEMA = pa.schema([(S.DOC_ID, pa.string()), (S.CLUSTER_ID, pa.string()),
                          (S.REPRESENTATIVE, pa.string()), (S.SIMILARITY, pa.float32())])


def verified_duplicates(docs, components_path: str, edges_path: str, cfg: MinHashConfig, num_partitions: int):
    cands = docs.select_columns([S.DOC_ID, S.TEXT]).map_batches(
        _candidate_shingles, batch_format="pyarrow",
        fn_kwargs={"components_path": components_path, "shingle_size": cfg.shingle_size},
    )
    return group_by_key(cands, "component", num_partitions, _verify_block,
                        fn_kwargs={"edges_path": edges_path, "threshold": cfg.jaccard_threshold})


# ---------------------------------------------------------------- 4) finalize: fuzzy removal, decontamination, split
def _finalize(batch: pa.Table, fuzzy_path: str, ngram_path: str, ngram: int, split_cfg: SplitConfig,
              named: dict[str, list[str]] | None = None) -> pa.Table:
    """``named``: per source, the held-out splits its records name themselves (they stay there);
    the source's other records are assigned by hash to train and the held-out splits it lacks."""
    dups = _fuzzy_duplicates(fuzzy_path)
    named = named or {}
    index = _ngram_index(ngram_path, ngram) if ngram_path else None
    rows = batch.to_pylist()
    for row in rows:
        dup = dups.get(row[S.DOC_ID])
        reason = None
        if dup is not None:
            reason = "fuzzy_duplicate"
            row[S.CLUSTER_ID], row[S.REPRESENTATIVE], row[S.SIMILARITY] = dup
        elif index is not None and index.contaminated(row[S.TEXT]):
            reason = "decontaminated"
        if reason:
            row.update({S.STATUS: S.STATUS_DROPPED, S.REASON: reason, S.RAW_EXCERPT: row[S.TEXT][:200], S.TEXT: None})
        else:
            row[S.SPLIT] = row[S.SPLIT] if row.get(S.SPLIT) in ("val", "test") else split_for(
                row[S.DOC_ID], row[S.LABEL] is not None, without(split_cfg, tuple(named.get(row[S.SOURCE], ()))))
    return S.docs_table(rows)


def finalize(ds, fuzzy_path: str, ngram_path: str, ngram: int, split_cfg: SplitConfig,
             named: dict[str, list[str]] | None = None):
    return ds.map_batches(_finalize, batch_format="pyarrow", fn_kwargs={
        "fuzzy_path": fuzzy_path, "ngram_path": ngram_path, "ngram": ngram, "split_cfg": split_cfg, "named": named})


# ---------------------------------------------------------------- 5) tokenize + pack + write
def _pack_batch(batch: pa.Table, tokenizer_dir: str, seq_len: int, out_dir: str, bos_id: int | None) -> pa.Table:
    meta = write_packed_shard(
        batch.column(S.DOC_ID).to_pylist(), batch.column(S.TEXT).to_pylist(), batch.column(S.SOURCE).to_pylist(),
        tokenizer_dir, seq_len, out_dir, bos_id,
    )
    meta["source_tokens"] = json.dumps(meta["source_tokens"], sort_keys=True)
    return pa.Table.from_pylist([meta])


def pack_shards(ds, tokenizer_dir: str, seq_len: int, out_dir: str, docs_per_shard: int,
                bos_id: int | None = None) -> list[dict]:
    """One shard per ``docs_per_shard`` consecutive documents (the last shard the rest). The
    strict repartition makes every group exactly that size whatever blocks the reader made;
    ``map_batches`` alone cuts its batches within the blocks each task is given, so a reader
    with smaller blocks made more, smaller shards (and a packing remainder per shard)."""
    ds = ds.repartition(target_num_rows_per_block=docs_per_shard, strict=True)
    meta = ds.map_batches(
        _pack_batch, batch_size=docs_per_shard, batch_format="pyarrow",
        fn_kwargs={"tokenizer_dir": tokenizer_dir, "seq_len": seq_len, "out_dir": out_dir, "bos_id": bos_id},
    ).take_all()
    for m in meta:
        m["source_tokens"] = json.loads(m["source_tokens"])
    return meta
