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

from jobs.common import parse_typed, run_job
from pipeline.evaluate.run import EvaluateConfig, check_evaluate, run_evaluate


def parse_config(argv: list[str]) -> EvaluateConfig:
    return parse_typed(EvaluateConfig, argv, __doc__.splitlines()[0])


def render(summary: dict) -> str:
    fit_on = (summary.get("classification") or {}).get("fit_on")
    return (f"results: {summary['output_dir']}/results.json, report: {summary['output_dir']}/report.md\n"
            + (f"warning: classification scored the {fit_on} data the classifier was fine-tuned with: its figures "
               f"are not a held-out measure\n" if fit_on else "")
            + json.dumps({k: {m: v.get(m) for m in ("perplexity", "accuracy", "f1_macro", "mean_gap")}
                          for k, v in summary.items() if isinstance(v, dict)}))


def main(argv: list[str] | None = None) -> int:
    return run_job(argv, parse_config, run_evaluate, render, preflight=check_evaluate)


if __name__ == "__main__":
    sys.exit(main())
