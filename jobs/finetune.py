"""Fine-tuning on Ray Train: chat/instruction SFT or sequence classification from a pretrained
checkpoint directory.

    python -m jobs.finetune --config jobs/configs/finetune_classify_demo.yaml [key=value ...]
    python -m jobs.finetune --config jobs/configs/finetune_sft_demo.yaml

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.finetune \
        --config jobs/configs/finetune_sft_demo.yaml base_model=/shared/models/my-gpt2 \
        data.train=/shared/chat.jsonl scaling.use_gpu=true scaling.num_workers=4 output_dir=/shared/finetune
"""

from __future__ import annotations

import json
import sys

from jobs.common import base_parser, setup_logging
from pipeline.config import apply_overrides, from_dict, load_yaml
from pipeline.finetune.finetune import FinetuneConfig, run_finetune
from pipeline.ray_utils import init_ray


def parse_config(argv: list[str]) -> FinetuneConfig:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    return from_dict(FinetuneConfig, apply_overrides(load_yaml(args.config), args.overrides))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = init_ray()
    try:
        summary = run_finetune(cfg)
        print(json.dumps({k: summary.get(k) for k in ("task", "model_dir", "steps", "best_val_loss", "examples", "rejected")}))
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
