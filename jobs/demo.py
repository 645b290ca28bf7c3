"""The whole workflow on the bundled corpora, on a local Ray cluster (``make demo``).

    python -m jobs.demo

Today it runs the prepare stage on ``bbc-news`` + ``chatterbot`` (jobs/configs/prepare_demo.yaml)
and prints its summary; later stages append themselves here.
"""

from __future__ import annotations

import sys
import time

from jobs.common import setup_logging
from jobs.prepare import parse_config, summary
from pipeline.data.prepare import run_prepare
from pipeline.ray_utils import init_ray


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    prepare_cfg = parse_config(["--config", "jobs/configs/prepare_demo.yaml", *argv])
    started = init_ray()
    t0 = time.time()
    try:
        manifest = run_prepare(prepare_cfg)
        print("\n== prepare ==")
        print(summary(manifest))
        print(f"\ndemo finished in {time.time() - t0:.1f}s")
        return 0
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
