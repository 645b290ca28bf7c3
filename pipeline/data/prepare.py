"""The prepare stage: sources -> parse -> normalize -> quality / harmful / PII / language ->
exact dedup -> fuzzy dedup -> decontamination -> split -> tokenizer -> packed Parquet shards,
with a manifest, an audit of what was removed and why, quarantine, and a report.

``run_prepare(cfg)`` expects Ray to be initialised (``jobs/prepare.py`` does it). Output goes to
``<output_dir>/<name>-<hash of the result-affecting config>``; each sub-step writes to
``<step>.tmp`` and renames on success, and ``manifest.json`` is written last, so a finished run is
not recomputed and an interrupted one resumes at the first unfinished step.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

import pipeline
from pipeline import schema as S
from pipeline.config import check, check_local, check_name, config_hash, to_dict
from pipeline.data import ray_ops
from pipeline.data.clean import CleanConfig, ParseConfig
from pipeline.data.decontam import DecontamConfig, NgramIndex
from pipeline.data.dedup import DedupConfig, components_from_edges
from pipeline.data.harmful import HarmfulConfig
from pipeline.data.language import LanguageConfig
from pipeline.data.normalize import NormalizeConfig
from pipeline.ray_utils import check_resources
from pipeline.data.pii import PIIConfig
from pipeline.data.quality import QualityConfig
from pipeline.data.sources import HIDDEN, SourceConfig, check_record_keys, expand_source, read_file, visible
from pipeline.data.split import SplitConfig, coverage_moves, uncovered
from pipeline.data.tokenizer import TokenizerConfig, copy_tokenizer, document_bos, train_tokenizer
from pipeline.stamps import FINISHED, check_inputs

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    seq_len: int = 512
    docs_per_shard: int = 2000  # documents per packing group = per output shard

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, f"pack.seq_len must be >= 2, got {self.seq_len}")
        check(self.docs_per_shard >= 1, f"pack.docs_per_shard must be >= 1, got {self.docs_per_shard}")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Execution knobs: they change speed, never the result (so they are not in the output hash)."""

    read_bundle_bytes: int = 16 << 20  # files are read in bundles of about this many bytes per task
    num_partitions: int | None = None  # shuffle partitions for dedup; default 2 x cluster CPUs

    def __post_init__(self) -> None:
        check(self.read_bundle_bytes > 0, f"runtime.read_bundle_bytes must be > 0, got {self.read_bundle_bytes}")
        check(self.num_partitions is None or self.num_partitions >= 1,
              f"runtime.num_partitions must be >= 1, got {self.num_partitions}")


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    sources: list[SourceConfig]
    output_dir: str = "outputs/prepare"
    name: str = "prepare"
    parse: ParseConfig = field(default_factory=ParseConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    harmful: HarmfulConfig = field(default_factory=HarmfulConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        check(bool(self.sources), "sources must list at least one source")
        names = [s.source_name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, f"sources: two sources are named {dup}; give each a distinct 'name'")
        check_name(self.name)
        check_local(self.output_dir, "output_dir")

    @property
    def clean(self) -> CleanConfig:
        return CleanConfig(normalize=self.normalize, quality=self.quality, harmful=self.harmful,
                           pii=self.pii, language=self.language)

    def result_hash(self) -> str:
        data = to_dict(self)
        for key in ("output_dir", "name", "runtime"):
            data.pop(key)
        for src in data["sources"]:  # a key added later: at its default, earlier runs keep their directories
            if isinstance(src, dict) and src.get("sample_by") == "document":
                del src["sample_by"]
        return config_hash(data)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / f"{self.name}-{self.result_hash()}"


# ---------------------------------------------------------------- step bookkeeping
def _step(out: Path, name: str, build) -> Path:
    """Run ``build(tmp_dir)`` unless ``out/name`` is complete; publish by rename."""
    final = out / name
    if (final / "_SUCCESS").exists():
        logger.info("step %s: already complete, reusing %s", name, final)
        return final
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    build(tmp)
    (tmp / "_SUCCESS").write_text("")
    os.replace(tmp, final)
    logger.info("step %s: done in %.1fs", name, time.time() - start)
    return final


def _parquet_files(path: Path) -> list[str]:
    return sorted(str(p) for p in path.glob("*.parquet"))


def _scan(path: Path, columns: list[str], filter=None):
    files = _parquet_files(path)
    if not files:
        return iter(())
    return pads.dataset(files, format="parquet").to_batches(columns=columns, filter=filter, batch_size=8192)


def _value_counts(path: Path, column: str, filter=None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in _scan(path, [column], filter):
        for item in batch.column(0).value_counts().to_pylist():
            counts[str(item["values"])] = counts.get(str(item["values"]), 0) + item["counts"]
    return counts


def _named_splits(path: Path) -> dict[str, list[str]]:
    """Per source, the held-out splits (val, test) its own records name (a DatasetDict's, a
    split_field's): the hash then fills only the others from that source's remaining records."""
    named: dict[str, set[str]] = {}
    flt = _is(S.STATUS, S.STATUS_KEPT) & pads.field(S.SPLIT).isin(["val", "test"])
    for batch in _scan(path, [S.SOURCE, S.SPLIT], flt):
        for src, split in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            named.setdefault(src, set()).add(split)
    return {src: sorted(v) for src, v in sorted(named.items())}


SPLIT_MOVES = "_split_moves.json"  # in the final step's directory ("_": not read as data, like _SUCCESS)


def _label_split_counts(path: Path) -> dict[str, dict[str, int]]:
    """Label -> split -> kept documents of a step's output."""
    counts: dict[str, dict[str, int]] = {}
    flt = _is(S.STATUS, S.STATUS_KEPT) & pads.field(S.LABEL).is_valid()
    for batch in _scan(path, [S.LABEL, S.SPLIT], flt):
        table = pa.Table.from_batches([batch]).group_by([S.LABEL, S.SPLIT]).aggregate([([], "count_all")])
        for row in table.to_pylist():
            per = counts.setdefault(row[S.LABEL], {})
            per[row[S.SPLIT]] = per.get(row[S.SPLIT], 0) + row["count_all"]
    return counts


def _labeled_rows(path: Path, labels: list[str]):
    """(doc_id, source, label, split) of the kept documents of these labels in a step's output."""
    flt = _is(S.STATUS, S.STATUS_KEPT) & pads.field(S.LABEL).isin(labels)
    for batch in _scan(path, [S.DOC_ID, S.SOURCE, S.LABEL, S.SPLIT], flt):
        yield from zip(*(batch.column(i).to_pylist() for i in range(4)))


def _apply_moves(path: Path, moves: list[dict]) -> None:
    """Rewrite the split of the moved documents in the Parquet files of a step's output."""
    to = {m["doc_id"]: m["to"] for m in moves}
    for file in _parquet_files(path) if to else []:
        table = pq.read_table(file)
        ids = table.column(S.DOC_ID).to_pylist()
        if not any(d in to for d in ids):
            continue
        index = table.schema.get_field_index(S.SPLIT)
        splits = [to.get(d, s) for d, s in zip(ids, table.column(S.SPLIT).to_pylist())]
        table = table.set_column(index, table.schema.field(index), pa.array(splits, type=table.schema.field(index).type))
        pq.write_table(table, file)


def split_moves(final_dir: Path) -> list[dict]:
    """The class-coverage moves of a run (none in a run made before they existed)."""
    path = final_dir / SPLIT_MOVES
    return json.loads(path.read_text()) if path.exists() else []


def _is(column: str, value: str):
    return pads.field(column) == value


def _read_kept(path: Path, split: str | None = None, columns: list[str] | None = None):
    """Ray dataset of the kept documents of a step's output (optionally one split)."""
    import ray
    from ray.data.expressions import col

    from pipeline.ray_utils import read_parquet

    files = _parquet_files(path)
    if not files:
        empty = S.DOCS_SCHEMA.empty_table()
        return ray.data.from_arrow(empty.select(columns) if columns else empty)
    expr = col(S.STATUS) == S.STATUS_KEPT
    if split is not None:
        expr = expr & (col(S.SPLIT) == split)
    ds = read_parquet(files).filter(expr=expr)
    return ds.select_columns(columns) if columns else ds


def _write(ds, tmp: Path) -> None:
    ds.write_parquet(str(tmp))


def _bundle(tasks: list[dict], target_bytes: int) -> list[list[dict]]:
    bundles, current, size = [], [], 0
    for task in tasks:
        current.append(task)
        size += max(task["size"], 4096)
        if size >= target_bytes:
            bundles.append(current)
            current, size = [], 0
    if current:
        bundles.append(current)
    return bundles


NOT_READ = {"under_output_dir": "under output_dir (earlier runs' outputs)", "hidden": HIDDEN}


def not_read_text(not_read: dict[str, dict[str, int]]) -> str:
    """``files_not_read`` (source -> reason -> files) in words, for the log, the report and the summary."""
    return "; ".join(f"{src}: {_left_text(left)}" for src, left in not_read.items())


def _left_text(left: dict[str, int]) -> str:
    return ", ".join(f"{n} {NOT_READ[k]}" for k, n in left.items())


def _files_to_read(tasks: list[dict], root: str, output_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """The tasks of a directory or glob source without the files that are no corpus, and how many of
    each kind (``NOT_READ``) were left out:
    - those under ``output_dir``: a corpus directory that holds the output directory would have a
      rerun read the earlier runs' shards, audit and labeled splits as documents;
    - hidden ones (``sources.hidden_below``): a dataset repository cloned with git would add every
      object under ``.git`` to the quarantine.
    What the source's own path names is read as given: a file inside the output directory, a hidden
    file, a glob of hidden names."""
    local = "://" not in root and "://" not in str(output_dir)
    out = output_dir.resolve() if local and not Path(root).resolve().is_relative_to(output_dir.resolve()) else None
    kept: list[dict] = []
    left: dict[str, int] = {}
    for t in tasks:
        if out is not None and "://" not in t["path"] and Path(t["path"]).resolve().is_relative_to(out):
            reason = "under_output_dir"
        elif t.get("hidden"):
            reason = "hidden"
        else:
            kept.append(t)
            continue
        left[reason] = left.get(reason, 0) + 1
    return kept, left


def _inputs(cfg: PrepareConfig) -> dict[str, str]:
    """The local inputs a run reads, by config key (URIs and built-in corpora are not stamped)."""
    return {**{f"sources[{i}]": src.path for i, src in enumerate(cfg.sources)},
            **{f"decontam.eval_paths[{i}]": p for i, p in enumerate(cfg.decontam.eval_paths if cfg.decontam.enabled else [])},
            "tokenizer.path": cfg.tokenizer.path}


# ---------------------------------------------------------------- the stage
def run_prepare(cfg: PrepareConfig) -> dict:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shard composition
    run_dir = cfg.run_dir
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        logger.info("prepare: %s is already complete (same config); not recomputing", run_dir)
        changed = check_inputs(run_dir, _inputs(cfg), "prepare", FINISHED, exclude=Path(cfg.output_dir))
        return {**json.loads(manifest_path.read_text()), **({"inputs_changed": changed} if changed else {})}
    start = time.time()
    # 0) list inputs up front: a missing path fails now, not after hours (and leaves no run directory)
    tasks, not_read = [], {}
    for i, src in enumerate(cfg.sources):
        src_tasks, left = _files_to_read(expand_source(src, i), src.path, Path(cfg.output_dir))
        where = f"sources[{i}] ({src.path!r})"
        if left:
            not_read[f"sources[{i}]"] = left
            logger.warning("prepare: files not read as documents: %s", not_read_text({where: left}))
        check(bool(src_tasks), f"{where}: no file to read: {_left_text(left)}")
        check_record_keys(src, where, {t["format"] for t in src_tasks})
        tasks += src_tasks
    run_dir.mkdir(parents=True, exist_ok=True)
    check_inputs(run_dir, _inputs(cfg), "prepare",  # an interrupted run's inputs: changed?
                 "it reuses the steps it finished" if any(run_dir.glob("_work/*/_SUCCESS")) else None,
                 exclude=Path(cfg.output_dir))
    work = run_dir / "_work"
    work.mkdir(exist_ok=True)
    check_resources({"CPU": 1}, "prepare (Ray Data tasks of one CPU each)")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    partitions = cfg.runtime.num_partitions or cfg.dedup.fuzzy.num_partitions or max(2, 2 * cpus)

    logger.info("prepare: %d files from %d source(s) -> %s", len(tasks), len(cfg.sources), run_dir)

    # 1) read, parse, normalize, filter, redact: every input record becomes one row
    def build_clean(tmp: Path) -> None:
        bundles = _bundle(tasks, cfg.runtime.read_bundle_bytes)
        items = [{"bundle": json.dumps(b)} for b in bundles]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ray_ops.read_and_clean, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"cfg": cfg.clean, "max_doc_bytes": cfg.parse.max_doc_bytes},
        )
        _write(ds, tmp)

    clean_dir = _step(work, "clean", build_clean)
    if not _value_counts(clean_dir, S.STATUS, _is(S.STATUS, S.STATUS_KEPT)):
        reasons = _value_counts(clean_dir, S.REASON)
        top = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
        raise ValueError(f"prepare: no document passed parsing and the filters ({sum(reasons.values())} records: "
                         f"{top or 'none read'}); relax the filters that removed them (quality.*, language.*, "
                         f"harmful.*) or check the sources. The rows and their reasons: {clean_dir}")

    # 2) exact dedup, global: a hash shuffle puts equal texts together; the smallest id is kept
    def build_exact(tmp: Path) -> None:
        ds = _read_kept(clean_dir)
        if cfg.dedup.exact.enabled:
            ds = ray_ops.exact_dedup(ds, partitions)
        _write(ds, tmp)

    exact_dir = _step(work, "exact", build_exact)

    # 3) fuzzy dedup: MinHash-LSH candidates -> connected components -> optional verification
    def build_fuzzy(tmp: Path) -> None:
        fz = cfg.dedup.fuzzy
        rows = pa.Table.from_pylist([], schema=ray_ops.FUZZY_SCHEMA)
        if fz.enabled:
            docs = _read_kept(exact_dir, columns=[S.DOC_ID, S.TEXT])
            edges = ray_ops.candidate_edges(docs, fz, partitions)
            edge_tables = [t.select(["a", "b"]) for t in edges.iter_batches(batch_format="pyarrow", batch_size=65536)]
            edge_table = pa.concat_tables(edge_tables) if edge_tables else pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string())})
            comp = components_from_edges([(edge_table["a"].to_pylist(), edge_table["b"].to_pylist())])
            logger.info("fuzzy dedup: %d candidate pairs linking %d documents", edge_table.num_rows, len(comp))
            if fz.verify and comp:
                comp_path, edges_path = tmp / "components.parquet", tmp / "edges.parquet"
                pq.write_table(pa.table({"doc_id": list(comp), "component": list(comp.values())}), comp_path)
                pq.write_table(edge_table.append_column("component", pa.array([comp[a] for a in edge_table["a"].to_pylist()], pa.string())), edges_path)
                verified = ray_ops.verified_duplicates(docs, str(comp_path), str(edges_path), fz, partitions)
                parts = [t for t in verified.iter_batches(batch_format="pyarrow") if t.num_rows]
                if parts:
                    rows = pa.concat_tables([p.cast(ray_ops.FUZZY_SCHEMA) for p in parts])
            elif comp:
                dups = sorted((d, r) for d, r in comp.items() if d != r)
                rows = pa.table({S.DOC_ID: [d for d, _ in dups], S.CLUSTER_ID: [r for _, r in dups],
                                 S.REPRESENTATIVE: [r for _, r in dups],
                                 S.SIMILARITY: pa.nulls(len(dups), pa.float32())}, schema=ray_ops.FUZZY_SCHEMA)
        pq.write_table(rows.sort_by(S.DOC_ID), tmp / "duplicates.parquet")

    fuzzy_dir = _step(work, "fuzzy", build_fuzzy)

    # 4) decontamination index (n-grams of the evaluation set)
    def build_decontam(tmp: Path) -> None:
        dc = cfg.decontam
        texts = []
        for i, path in enumerate(dc.eval_paths):
            for task in visible(expand_source(SourceConfig(path=path, name=f"eval{i}", text_field=dc.text_field), i))[0]:
                texts.extend(r[S.TEXT] for r in read_file(task, cfg.parse.max_doc_bytes) if r.get(S.TEXT))
        np.save(tmp / "ngrams.npy", NgramIndex.from_texts(texts, dc.ngram).hashes)

    ngram_path = ""
    if cfg.decontam.enabled:
        ngram_path = str(_step(work, "decontam", build_decontam) / "ngrams.npy")

    # 5) remove fuzzy duplicates and contaminated docs, assign splits
    def build_final(tmp: Path) -> None:
        named = _named_splits(exact_dir)
        ds = ray_ops.finalize(_read_kept(exact_dir), str(fuzzy_dir / "duplicates.parquet"), ngram_path,
                              cfg.decontam.ngram, cfg.split, named)
        _write(ds, tmp)
        # every class in each held-out split its size calls for (a small labeled corpus can miss one)
        short = uncovered(_label_split_counts(tmp), cfg.split)
        moves = coverage_moves(_labeled_rows(tmp, sorted(short)), cfg.split, named) if short else []
        _apply_moves(tmp, moves)
        (tmp / SPLIT_MOVES).write_text(json.dumps(moves, indent=1))

    final_dir = _step(work, "final", build_final)

    # 6) tokenizer: trained on the train split (or a given local one), saved in HF format
    def build_tokenizer(tmp: Path) -> None:
        if cfg.tokenizer.path:
            copy_tokenizer(cfg.tokenizer.path, tmp, cfg.tokenizer)
            return
        flt = _is(S.STATUS, S.STATUS_KEPT) & _is(S.SPLIT, "train")
        kept = _value_counts(final_dir, S.SPLIT, _is(S.STATUS, S.STATUS_KEPT))
        check(kept.get("train", 0) > 0, f"prepare: the train split is empty (kept documents per split: {kept}), so there "
                                        f"is nothing to train the tokenizer on; lower split.val_fraction / "
                                        f"split.test_fraction, add documents, or give tokenizer.path")
        limit = cfg.tokenizer.max_train_docs

        def texts():
            n = 0
            for batch in _scan(final_dir, [S.TEXT], flt):
                for text in batch.column(0).to_pylist():
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield text

        train_tokenizer(texts(), cfg.tokenizer, tmp)

    tok_dir = _step(run_dir, "tokenizer", build_tokenizer)

    # 7) tokenize + pack + write shards per split
    bos_id = document_bos(tok_dir)
    if bos_id is not None:
        logger.info("prepare: every document opens with the tokenizer's BOS (id %d), as it encodes a text", bos_id)
    shards: list[dict] = []
    token_stats: dict[str, dict] = {}
    for split in SPLITS:
        def build_split(tmp: Path, split=split) -> None:
            ds = _read_kept(final_dir, split, columns=[S.DOC_ID, S.SOURCE, S.TEXT])
            meta = ray_ops.pack_shards(ds, str(tok_dir), cfg.pack.seq_len, str(tmp), cfg.pack.docs_per_shard, bos_id)
            meta.sort(key=lambda m: m["first_doc_id"])
            written = [m for m in meta if m["path"]]
            for i, m in enumerate(written):
                name = f"shard-{i:05d}-of-{len(written):05d}.parquet"
                os.replace(m["path"], tmp / name)
                m["path"] = f"{split}/{name}"
            (tmp / "_shards.json").write_text(json.dumps(meta, indent=1))

        split_dir = _step(run_dir, split, build_split)
        meta = json.loads((split_dir / "_shards.json").read_text())
        shards.extend({"path": m["path"], "split": split, "rows": m["rows"]} for m in meta if m["path"])
        per_source: dict[str, int] = {}
        for m in meta:
            for src, n in m["source_tokens"].items():
                per_source[src] = per_source.get(src, 0) + n
        token_stats[split] = {
            "packed": sum(m["packed_tokens"] for m in meta), "documents": sum(m["doc_tokens"] for m in meta),
            "remainder": sum(m["remainder"] for m in meta), "rows": sum(m["rows"] for m in meta),
            "num_docs": sum(m["num_docs"] for m in meta), "per_source": per_source,
        }

    # 8) labeled splits (text, label) for fine-tuning
    def build_labeled(tmp: Path) -> None:
        for split in SPLITS:
            flt = _is(S.STATUS, S.STATUS_KEPT) & _is(S.SPLIT, split) & pads.field(S.LABEL).is_valid()
            batches = list(_scan(final_dir, [S.DOC_ID, S.SOURCE, S.TEXT, S.LABEL], flt))
            table = pa.Table.from_batches(batches) if batches else None
            if table is not None and table.num_rows:
                pq.write_table(table.sort_by(S.DOC_ID), tmp / f"{split}.parquet")

    labeled_dir = _step(run_dir, "labeled", build_labeled)

    # 9) audit: removed documents with their reason, and quarantined records
    def audit(name: str, status: str, dirs: tuple[Path, ...]):
        def build(tmp: Path) -> None:
            with pq.ParquetWriter(tmp / f"{name}.parquet", S.REMOVED_SCHEMA) as writer:
                for path in dirs:
                    for batch in _scan(path, S.REMOVED_SCHEMA.names, _is(S.STATUS, status)):
                        writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=S.REMOVED_SCHEMA))

        _step(run_dir, name, build)

    audit("removed", S.STATUS_DROPPED, (clean_dir, exact_dir, final_dir))
    audit("quarantine", S.STATUS_QUARANTINED, (clean_dir,))

    # 10) counts (with the invariant), report, manifest last
    counts = count_documents(clean_dir, exact_dir, final_dir)
    from pipeline.data.report import write_report

    manifest = {
        "name": cfg.name,
        "config_hash": cfg.result_hash(),
        "output_dir": str(run_dir),
        "counts": counts,
        "tokens": {"train": token_stats["train"]["packed"], "val": token_stats["val"]["packed"],
                   "test": token_stats["test"]["packed"], "seq_len": cfg.pack.seq_len, "per_split": token_stats,
                   "document_bos": bos_id},
        "shards": shards,
        "tokenizer": str(tok_dir),
        "labeled": sorted(str(p.relative_to(run_dir)) for p in labeled_dir.glob("*.parquet")),
        "removed": "removed/removed.parquet",
        "quarantine": "quarantine/quarantine.parquet",
        "duplicates": {"exact": counts["dropped"].get("exact_duplicate", 0),
                       "fuzzy": counts["dropped"].get("fuzzy_duplicate", 0)},
        "config": to_dict(cfg),
        "versions": _versions(),
        "files_not_read": not_read,  # per source: files under output_dir or hidden, left out (NOT_READ)
        "seconds": round(time.time() - start, 2),
    }
    manifest["report"] = write_report(run_dir, manifest, clean_dir, final_dir)
    tmp_manifest = run_dir / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp_manifest, manifest_path)
    logger.info("prepare: finished in %.1fs -> %s", manifest["seconds"], run_dir)
    return json.loads(manifest_path.read_text())  # the same plain data a rerun returns


def count_documents(clean_dir: Path, exact_dir: Path, final_dir: Path) -> dict:
    clean = _value_counts(clean_dir, S.STATUS)
    exact = _value_counts(exact_dir, S.STATUS)
    final = _value_counts(final_dir, S.STATUS)
    dropped: dict[str, int] = {}
    for path in (clean_dir, exact_dir, final_dir):
        for reason, n in _value_counts(path, S.REASON, _is(S.STATUS, S.STATUS_DROPPED)).items():
            dropped[reason] = dropped.get(reason, 0) + n
    quarantined_by_reason = _value_counts(clean_dir, S.REASON, _is(S.STATUS, S.STATUS_QUARANTINED))
    by_source: dict[str, dict[str, int]] = {}
    for path in (clean_dir, exact_dir, final_dir):
        for batch in _scan(path, [S.SOURCE, S.REASON], pads.field(S.STATUS) != S.STATUS_KEPT):
            for src, reason in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                by_source.setdefault(src, {}).setdefault(reason, 0)
                by_source[src][reason] += 1
    counts = {
        "input_docs": sum(clean.values()),
        "kept_docs": final.get(S.STATUS_KEPT, 0),
        "quarantined": clean.get(S.STATUS_QUARANTINED, 0),
        "dropped": dict(sorted(dropped.items())),
        "quarantined_by_reason": dict(sorted(quarantined_by_reason.items())),
        "kept_by_split": _value_counts(final_dir, S.SPLIT, _is(S.STATUS, S.STATUS_KEPT)),
        "split_moves": split_moves(final_dir),  # labeled documents moved so that each class is in val / test
        "splits_named_by_source": _named_splits(exact_dir),
        "kept_by_source": _value_counts(final_dir, S.SOURCE, _is(S.STATUS, S.STATUS_KEPT)),
        "input_by_source": _value_counts(clean_dir, S.SOURCE),
        "removed_by_source": {k: dict(sorted(v.items())) for k, v in sorted(by_source.items())},
    }
    # Every stage passes each of its input rows on exactly once.
    assert sum(exact.values()) == clean.get(S.STATUS_KEPT, 0), f"exact dedup lost rows: {exact} vs {clean}"
    assert sum(final.values()) == exact.get(S.STATUS_KEPT, 0), f"finalize lost rows: {final} vs {exact}"
    total = counts["kept_docs"] + sum(dropped.values()) + counts["quarantined"]
    assert counts["input_docs"] == total, f"document accounting is off: {counts}"
    return counts


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "pipeline": pipeline.__version__}
    for pkg in ("ray", "pyarrow", "tokenizers", "transformers", "datasets", "numpy", "ftfy", "trafilatura", "langid"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
