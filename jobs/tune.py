"""Hyperparameter search with Ray Tune (ASHA on validation loss) over the real pretraining run;
writes the best configuration as a pretrain YAML, a results table and a plot.

    python -m jobs.tune --config jobs/configs/tune_demo.yaml [key=value ...]
    python -m jobs.pretrain --config outputs/tune/<run>/best_pretrain.yaml    # train the winner

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.tune \
        --config jobs/configs/tune_demo.yaml num_samples=32 output_dir=/shared/tune
"""

from __future__ import annotations

import json
import sys

from jobs.common import base_parser, setup_logging
from pipeline.config import apply_overrides, from_dict, load_yaml
from pipeline.ray_utils import init_ray
from pipeline.tune.sweep import TuneConfig, run_tune


def parse_config(argv: list[str]) -> TuneConfig:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    return from_dict(TuneConfig, apply_overrides(load_yaml(args.config), args.overrides))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = init_ray()
    try:
        summary = run_tune(cfg)
        print(json.dumps({k: summary[k] for k in ("best", "best_config", "num_trials", "stopped_early")}, default=str))
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
