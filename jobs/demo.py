"""The whole workflow on the bundled corpora, on a local Ray cluster (``make demo``).

    python -m jobs.demo

1. prepare: bbc-news + chatterbot -> clean, deduplicated, packed shards (prepare_demo.yaml)
2. pretrain: the small GPT-2 on those shards with Ray Train, 2 workers (pretrain_demo.yaml)

and a summary of both. Each stage is skipped when its output for the same config exists.
"""

from __future__ import annotations

import math
import sys
import time

from jobs.common import setup_logging
from jobs.prepare import parse_config as parse_prepare
from jobs.prepare import summary as prepare_summary
from jobs.pretrain import parse_config as parse_pretrain
from pipeline.data.prepare import run_prepare
from pipeline.ray_utils import init_ray
from pipeline.train.pretrain import run_pretrain


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    prepare_cfg = parse_prepare(["--config", "jobs/configs/prepare_demo.yaml"])
    pretrain_cfg = parse_pretrain(["--config", "jobs/configs/pretrain_demo.yaml"])
    started = init_ray()
    t0 = time.time()
    try:
        manifest = run_prepare(prepare_cfg)
        t_prepare = time.time() - t0
        pre = run_pretrain(pretrain_cfg)
        print("\n== prepare ==")
        print(prepare_summary(manifest))
        print("\n== pretrain ==")
        final = pre["final"] or {}
        print(f"  {pre['arch']} ({pre['objective']}), {pre['steps']} steps, {pre['tokens']} tokens, {pre['seconds']} s")
        print(f"  val loss {final.get('val_loss', float('nan')):.3f}, val perplexity {final.get('val_ppl', math.nan):.1f} "
              f"(best val loss {pre['best_val_loss']:.3f})")
        print(f"  model: {pre['model_dir']}  loss curves: {pre['run_dir']}/loss_curves.png")
        print(f"\ndemo finished in {time.time() - t0:.1f}s (prepare {t_prepare:.1f}s)")
        return 0
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
