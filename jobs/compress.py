"""Compression: pruned (magnitude, structured) and int8 variants of trained models, each saved as
a servable directory, with a size / speed / quality table against the base.

    python -m jobs.compress --config jobs/configs/compress_demo.yaml [key=value ...]

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.compress \
        --config jobs/configs/compress_demo.yaml output_dir=/shared/compress
"""

from __future__ import annotations

import sys

from jobs.common import parse_typed, run_job
from pipeline.compress.run import CompressConfig, check_compress, render_table, run_compress


def parse_config(argv: list[str]) -> CompressConfig:
    return parse_typed(CompressConfig, argv, __doc__.splitlines()[0])


def render(summary: dict) -> str:
    return f"variants in {summary['output_dir']}\n\n" + render_table(summary["rows"])


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_compress, render, preflight=check_compress)


if __name__ == "__main__":
    sys.exit(main())
