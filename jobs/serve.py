"""Serving: the models behind an OpenAI-compatible HTTP API on Ray Serve (127.0.0.1:8000 by default).

    python -m jobs.serve --model outputs/pretrain/.../model            # one model, named after its directory
                                                                       # (kind from the directory: classifier, chat or causal)
    python -m jobs.serve --model base=DIR --model chat=DIR:chat --model topics=DIR:classifier
    python -m jobs.serve --config jobs/configs/serve_demo.yaml [key=value ...]   # our file or Serve's
    serve run jobs/configs/serve_demo.yaml                             # Serve's own CLI, same app

Flags: --host, --port, --api-key (or $PIPELINE_SERVE_API_KEY), --smoke (send one request of each
kind, print the answers, shut down). Without --smoke it serves until interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import setup_logging
from pipeline.serve.app import ServeConfig


def _model_arg(spec: str) -> dict:
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = "", spec
    path, _, kind = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ("causal", "chat", "classifier") else (rest, "", "")
    path = path or rest
    if not kind:  # a model directory says what it is; YAML and compress references are causal
        from pipeline.serve.app import infer_kind

        kind = infer_kind(path) or ""
    return {"name": name or Path(path.rstrip("/")).name.replace("_", "-") or "model", "path": path,
            **({"kind": kind} if kind else {})}


def parse_args(argv: list[str]) -> tuple[ServeConfig, bool]:
    from pipeline.config import apply_overrides, from_dict
    from pipeline.serve.launch import config_from_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="models YAML (ServeConfig) or Serve config file")
    p.add_argument("--model", action="append", default=[], help="[NAME=]DIR[:causal|chat|classifier]; repeatable")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key")
    p.add_argument("--smoke", action="store_true", help="send one request of each kind, print, shut down")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. request_timeout_s=30")
    a = p.parse_args(argv)
    if not a.config and not a.model:
        p.error("give --config or at least one --model")
    from pipeline.config import to_dict

    data = to_dict(config_from_file(a.config)) if a.config else {}
    if a.model:
        data["models"] = [_model_arg(m) for m in a.model]
    for key in ("host", "port", "api_key"):
        if getattr(a, key) is not None:
            data[key] = getattr(a, key)
    return from_dict(ServeConfig, apply_overrides(data, a.overrides)), a.smoke


def parse_config(argv: list[str]) -> ServeConfig:
    return parse_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg, smoke_only = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:  # the models are what their kinds say (or are read as), before Ray starts
        from dataclasses import replace

        from pipeline.serve.app import resolve_model

        cfg = replace(cfg, models=[resolve_model(m) for m in cfg.models])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.ray_utils import init_ray
    from pipeline.serve.launch import smoke, start, stop, stop_on_sigterm

    stop_on_sigterm()  # `ray job stop` and `kill` end the app as Ctrl-C does
    started = init_ray()
    try:
        url = start(cfg)
        print(f"serving {[m.name for m in cfg.models]} at {url} (OpenAI API under {url}/v1)")
        if smoke_only:
            for what, answer in smoke(url, cfg):
                print(f"  {what}: {answer!r}")
            return 0
        print(f"try: curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{cfg.models[0].name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop(cfg, started)


if __name__ == "__main__":
    sys.exit(main())
