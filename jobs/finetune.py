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
from pathlib import Path

from jobs.common import parse_typed, run_job
from pipeline.finetune.finetune import FinetuneConfig, check_finetune, run_finetune


def parse_config(argv: list[str]) -> FinetuneConfig:
    return parse_typed(FinetuneConfig, argv, __doc__.splitlines()[0])


def render(summary: dict) -> str:
    line = json.dumps({k: summary.get(k) for k in ("task", "model_dir", "steps", "best_val_loss", "exported", "examples",
                                                   "rejected")})
    if summary.get("rejected") and summary.get("model_dir"):
        line += f"\n{summary['rejected']} record(s) rejected, each with its reason: " \
                f"{Path(summary['model_dir']).parent / 'rejected.json'}"
    return line


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_finetune, render, preflight=check_finetune)


if __name__ == "__main__":
    sys.exit(main())
