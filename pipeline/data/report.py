"""The prepare stage's report: a markdown page with PNG plots (document length before and after
cleaning, drops per reason, tokens per source) written next to the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from pipeline import schema as S


def _column(path: Path, column: str, filter=None) -> np.ndarray:
    files = sorted(str(p) for p in path.glob("*.parquet"))
    if not files:
        return np.array([])
    table = pads.dataset(files, format="parquet").to_table(columns=[column], filter=filter)
    return table.column(0).to_numpy(zero_copy_only=False)


def write_report(run_dir: Path, manifest: dict, clean_dir: Path, final_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.data.prepare import not_read_text

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    counts = manifest["counts"]

    # 1) document length (characters) before cleaning vs kept documents after
    before = _column(clean_dir, S.N_CHARS_RAW, pads.field(S.STATUS) != S.STATUS_QUARANTINED).astype(float)
    after = _column(final_dir, S.N_CHARS, pads.field(S.STATUS) == S.STATUS_KEPT).astype(float)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.logspace(0, np.log10(max(10.0, before.max() if before.size else 10.0)), 50)
    ax.hist(before, bins=bins, alpha=0.5, label=f"input ({before.size})")
    ax.hist(after, bins=bins, alpha=0.5, label=f"kept ({after.size})")
    ax.set_xscale("log")
    ax.set_xlabel("characters per document")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("Document length before / after")
    fig.tight_layout()
    fig.savefig(out / "doc_length.png", dpi=100)
    plt.close(fig)

    # 2) drops per reason (quarantine reasons included, marked)
    reasons = dict(counts["dropped"])
    reasons.update({f"quarantine:{k}": v for k, v in counts["quarantined_by_reason"].items()})
    items = sorted(reasons.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(items) + 1)))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("documents")
    ax.set_title("Removed documents per reason")
    fig.tight_layout()
    fig.savefig(out / "drops_per_reason.png", dpi=100)
    plt.close(fig)

    # 3) tokens per source and split
    per_split = manifest["tokens"]["per_split"]
    sources = sorted({s for v in per_split.values() for s in v["per_source"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(sources))
    for split, stats in per_split.items():
        vals = np.array([stats["per_source"].get(s, 0) for s in sources], dtype=float)
        ax.bar(sources, vals, bottom=bottom, label=split)
        bottom += vals
    ax.set_ylabel("tokens (document tokens + end-of-text)")
    ax.set_title("Tokens per source")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tokens_per_source.png", dpi=100)
    plt.close(fig)

    lines = [
        f"# Prepare report: {manifest['name']} ({manifest['config_hash']})", "",
        f"- input documents: {counts['input_docs']}",
        f"- kept documents: {counts['kept_docs']} (by split: {counts['kept_by_split']})",
        *([f"- moved so that each class is in every held-out split its size calls for: "
           + ", ".join(f"{m['doc_id']} ({m['label']}) to {m['to']}" for m in counts["split_moves"])]
          if counts.get("split_moves") else []),
        *([f"- files not read as documents: {not_read_text(manifest['files_not_read'])}"]
          if manifest.get("files_not_read") else []),
        f"- dropped: {sum(counts['dropped'].values())}; quarantined: {counts['quarantined']}",
        f"- exact duplicates: {manifest['duplicates']['exact']}; fuzzy duplicates: {manifest['duplicates']['fuzzy']}",
        f"- packed tokens: train {manifest['tokens']['train']}, val {manifest['tokens']['val']}, "
        f"test {manifest['tokens']['test']} (seq_len {manifest['tokens']['seq_len']})",
        f"- shards: {len(manifest['shards'])}; time: {manifest['seconds']} s", "",
        "## Removed per reason", "", "| reason | documents |", "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])], "",
        "## Tokens per source", "", "| source | " + " | ".join(per_split) + " |",
        "|---|" + "---:|" * len(per_split),
        *[f"| {s} | " + " | ".join(str(per_split[sp]["per_source"].get(s, 0)) for sp in per_split) + " |" for s in sources],
        "", "![document length](doc_length.png)", "", "![drops per reason](drops_per_reason.png)", "",
        "![tokens per source](tokens_per_source.png)", "",
        "Audit: `removed/removed.parquet` (doc id, source, reason, cluster id and representative for "
        "duplicates) and `quarantine/quarantine.parquet` (unparseable records with an excerpt).", "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return "report/report.md"
