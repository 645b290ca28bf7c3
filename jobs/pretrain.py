"""Pretraining on Ray Train: packed shards from the prepare stage -> a causal or masked LM in
Hugging Face format.

    python -m jobs.pretrain --config jobs/configs/pretrain_demo.yaml [key=value ...]

On a cluster with GPUs::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.pretrain \
        --config jobs/configs/pretrain_demo.yaml model.preset=gpt2-124m scaling.use_gpu=true \
        scaling.num_workers=8 data=/shared/prepared/prepare-demo-<hash> output_dir=/shared/pretrain
"""

from __future__ import annotations

import json
import sys

from jobs.common import parse_typed, run_job
from pipeline.train.pretrain import PretrainConfig, check_pretrain, run_pretrain


def parse_config(argv: list[str]) -> PretrainConfig:
    return parse_typed(PretrainConfig, argv, __doc__.splitlines()[0])


def render(summary: dict) -> str:
    return json.dumps({k: summary[k] for k in ("model_dir", "steps", "tokens", "best_val_loss", "seconds")})


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_pretrain, render, preflight=check_pretrain)


if __name__ == "__main__":
    sys.exit(main())
