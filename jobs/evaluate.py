"""Evaluation: perplexity / bits per byte, classification metrics next to a TF-IDF baseline,
few-shot classification, bias probes; JSON + markdown report.

    python -m jobs.evaluate --config jobs/configs/evaluate_demo.yaml [key=value ...]

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.evaluate \
        --config jobs/configs/evaluate_demo.yaml output_dir=/shared/eval
"""

from __future__ import annotations

import json
import sys

from jobs.common import base_parser, setup_logging
from pipeline.config import apply_overrides, from_dict, load_yaml
from pipeline.evaluate.run import EvaluateConfig, run_evaluate
from pipeline.ray_utils import init_ray


def parse_config(argv: list[str]) -> EvaluateConfig:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    return from_dict(EvaluateConfig, apply_overrides(load_yaml(args.config), args.overrides))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    started = init_ray()
    try:
        results = run_evaluate(cfg)
        print(f"results: {results['output_dir']}/results.json, report: {results['output_dir']}/report.md")
        print(json.dumps({k: {m: v.get(m) for m in ("perplexity", "accuracy", "f1_macro", "mean_gap")}
                          for k, v in results.items() if isinstance(v, dict)}))
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
