"""Shared command-line plumbing for the jobs: ``--config``, ``key=value`` overrides, logging, and
the parse -> connect -> run -> tear down sequence every job follows."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray.data", "trafilatura", "htmldate", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.model.build import quiet_loading

    quiet_loading()


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None,
                        help="YAML config file (without one: the job's defaults, then the key=value overrides)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. pack.seq_len=256")
    return parser


def parse_typed(cls: type[T], argv: list[str], description: str) -> T:
    """``[--config FILE] [key=value ...]`` -> the job's typed config (ValueError names a bad key)."""
    from pipeline.config import apply_overrides, from_dict

    args = base_parser(description).parse_args(argv)
    return from_dict(cls, apply_overrides(config_data(args.config), args.overrides))


def config_data(path: str | None) -> dict:
    """The YAML file's mapping, or an empty one (every key at its default) without a file."""
    from pipeline.config import load_yaml

    return {} if path is None else load_yaml(path)


def run_job(argv: list[str] | None, parse: Callable[[list[str]], T], run: Callable[[T], dict],
            render: Callable[[dict], str], preflight: Callable[[T], None] | None = None) -> int:
    """Parse the config, check its inputs (``preflight``: model directories and their kinds, what
    needs no cluster), connect to Ray (or start a local cluster), run one library function, print
    its summary, and shut down what this call started. Bad input exits 2 with a message, before
    Ray starts where it can be seen without it."""
    from pipeline.ray_utils import init_ray

    setup_logging()
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        if preflight is not None:
            preflight(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = init_ray()
    try:
        summary = run(cfg)
        print(render(summary))
        if isinstance(summary, dict) and summary.get("inputs_changed"):  # a finished run, reused (pipeline/stamps.py)
            print("warning: inputs changed since this run was made, and its finished result was reused: "
                  + "; ".join(summary["inputs_changed"]) + ". To redo it, rerun with another name= (or delete its "
                  "directory)", file=sys.stderr)
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()
