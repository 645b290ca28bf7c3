"""Prepare stage: raw corpora -> clean, deduplicated, tokenized, packed Parquet shards.

Locally (starts a local Ray cluster unless RAY_ADDRESS is set)::

    python -m jobs.prepare --config jobs/configs/prepare_demo.yaml [key=value ...] \
        [--input PATH_OR_URI ...] [--output DIR]

On a running cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.prepare --config jobs/configs/prepare_demo.yaml --output /shared/outputs
"""

from __future__ import annotations

import json
import sys

from jobs.common import base_parser, config_data, run_job
from pipeline.config import apply_overrides, from_dict
from pipeline.data.prepare import PrepareConfig, not_read_text, run_prepare

def parse_config(argv: list[str]) -> PrepareConfig:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", default=None,
                        help="path, glob or URI (repeatable); replaces the config's sources")
    parser.add_argument("--output", default=None, help="output root directory (replaces output_dir)")
    args = parser.parse_args(argv)
    data = config_data(args.config)
    if args.input:
        data["sources"] = list(args.input)
    if args.output:
        data["output_dir"] = args.output
    if isinstance(data.get("sources"), list) and any(o.startswith("sources.") for o in args.overrides):
        # a source given as a string is {path: it}: `--input data/ sources.0.text_field=body` sets that
        # input's field, as it would a source written as a mapping
        data["sources"] = [{"path": src} if isinstance(src, str) else src for src in data["sources"]]
    return from_dict(PrepareConfig, apply_overrides(data, args.overrides))


def summary(manifest: dict) -> str:
    c, t = manifest["counts"], manifest["tokens"]
    lines = [
        f"prepare: {manifest['output_dir']}",
        f"  documents: input {c['input_docs']}, kept {c['kept_docs']}, dropped {sum(c['dropped'].values())}, "
        f"quarantined {c['quarantined']}",
        f"  duplicates found: exact {manifest['duplicates']['exact']}, fuzzy {manifest['duplicates']['fuzzy']}",
        *[f"    {src:<20} exact {r.get('exact_duplicate', 0)}, fuzzy {r.get('fuzzy_duplicate', 0)}"
          for src, r in c["removed_by_source"].items()],
        "  dropped per reason:" + ("" if c["dropped"] else " none"),
        *[f"    {k:<40} {v}" for k, v in sorted(c["dropped"].items(), key=lambda kv: -kv[1])],
        "  quarantined per reason:" + ("" if c["quarantined_by_reason"] else " none"),
        *[f"    {k:<40} {v}" for k, v in c["quarantined_by_reason"].items()],
        f"  kept by split: {c['kept_by_split']}",
        *([f"  moved so that each class is in val / test: " + ", ".join(f"{m['label']} to {m['to']}" for m in c["split_moves"])]
          if c.get("split_moves") else []),
        *([f"  files not read as documents: {not_read_text(manifest['files_not_read'])}"]
          if manifest.get("files_not_read") else []),
        f"  tokens: train {t['train']}, val {t['val']}, test {t['test']} (seq_len {t['seq_len']})",
        f"  shards: {len(manifest['shards'])}; tokenizer: {manifest['tokenizer']}",
        f"  report: {manifest['output_dir']}/{manifest['report']}; time: {manifest['seconds']} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_prepare,
                   lambda m: summary(m) + "\n" + json.dumps({"manifest": f"{m['output_dir']}/manifest.json"}))


if __name__ == "__main__":
    sys.exit(main())
