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

from jobs.common import base_parser, setup_logging
from pipeline.config import apply_overrides, from_dict, load_yaml
from pipeline.ray_utils import init_ray
from pipeline.train.pretrain import PretrainConfig, run_pretrain


def parse_config(argv: list[str]) -> PretrainConfig:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    return from_dict(PretrainConfig, apply_overrides(load_yaml(args.config), args.overrides))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = init_ray()
    try:
        summary = run_pretrain(cfg)
        print(json.dumps({k: summary[k] for k in ("model_dir", "steps", "tokens", "best_val_loss", "seconds")}))
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
