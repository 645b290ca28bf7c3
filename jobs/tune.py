"""Hyperparameter search with Ray Tune (ASHA on the validation metric) over the real pretraining
or fine-tuning run; writes the best configuration as a pretrain / finetune YAML, a results table
and a plot.

    python -m jobs.tune --config jobs/configs/tune_demo.yaml [key=value ...]
    python -m jobs.pretrain --config outputs/tune/<run>/best_pretrain.yaml    # train the winner
    python -m jobs.tune --config jobs/configs/tune_demo.yaml base=jobs/configs/finetune_classify_demo.yaml \
        metric=val_accuracy                                                   # sweep a fine-tune

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.tune \
        --config jobs/configs/tune_demo.yaml num_samples=32 output_dir=/shared/tune
"""

from __future__ import annotations

import json
import sys

from jobs.common import parse_typed, run_job
from pipeline.tune.sweep import TuneConfig, check_tune, run_tune


def parse_config(argv: list[str]) -> TuneConfig:
    return parse_typed(TuneConfig, argv, __doc__.splitlines()[0])


def render(summary: dict) -> str:
    return json.dumps({k: summary[k] for k in ("best", "best_config", "num_trials", "stopped_early")}, default=str)


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_tune, render, preflight=check_tune)


if __name__ == "__main__":
    sys.exit(main())
