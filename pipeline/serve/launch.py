"""Start the Serve application on the connected Ray cluster, wait until it is ready, and (for the
demo) send one request of each kind and print the answers."""

import json
import logging
import time

import requests

from pipeline.config import from_dict, load_yaml
from pipeline.serve.app import API_KEY_ENV, ServeConfig, build_app

logger = logging.getLogger(__name__)


def config_from_file(path: str, overrides: list[str] | None = None) -> ServeConfig:
    """Our models file, or Serve's config file (``applications: [...]``) whose application uses
    ``pipeline.serve.app:app_builder``: its ``args`` (``config:`` file and inline keys) and its
    ``http_options`` host and port."""
    from pipeline.config import apply_overrides

    data = load_yaml(path)
    if "applications" in data:
        apps = [a for a in data["applications"] if str(a.get("import_path", "")).startswith("pipeline.serve.app:")]
        if not apps:
            raise ValueError(f"{path}: no application imports pipeline.serve.app:app_builder")
        args = dict(apps[0].get("args") or {})
        inner = load_yaml(args.pop("config")) if "config" in args else {}
        http = data.get("http_options") or {}
        data = {**inner, **args, **{k: http[k] for k in ("host", "port") if k in http},
                "app_name": apps[0].get("name", "llm")}
    return from_dict(ServeConfig, apply_overrides(data, overrides or []))


def start(cfg: ServeConfig) -> str:
    """Deploy (or redeploy) the application; returns its base URL once /ready answers 200."""
    from ray import serve

    check_replica_resources(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve application at {url} did not become ready within 300 s")


def stop(cfg: ServeConfig, started_ray: bool) -> None:
    """End what ``start`` deployed. On a local cluster this process started: Serve and Ray. On a
    joined cluster: this application only; Serve and any other application on it keep running
    (``serve.shutdown`` would end every application on the cluster)."""
    import ray
    from ray import serve

    if started_ray:
        serve.shutdown()
        ray.shutdown()
        return
    try:
        serve.delete(cfg.app_name)
    except Exception as e:  # noqa: BLE001 - the app may never have deployed; exit anyway
        logger.warning("deleting the Serve application %r failed: %s", cfg.app_name, e)


def stop_on_sigterm() -> None:
    """SIGTERM (what ``ray job stop`` and ``kill`` send) raises KeyboardInterrupt in the main
    thread, so the job's ``finally`` ends the application as Ctrl-C does: by default Python dies on
    SIGTERM without unwinding, and the Serve application, which outlives its driver, kept
    serving and holding its replicas' CPUs."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def replica_cpus(cfg: ServeConfig) -> float:
    """CPUs the application holds at its smallest: each model's minimum replicas times its
    ``cpus``, and the gateway's (Serve's controller and proxy reserve none)."""
    return cfg.gateway_cpus + sum(m.autoscaling.min_replicas * m.cpus for m in cfg.models)


def check_replica_resources(cfg: ServeConfig) -> None:
    """Serve waits without end for replicas the cluster has no room for (``serve.run`` does not
    return, the controller logs a warning every 30 s): on a local cluster that cannot grow that is
    an error naming the keys to lower; on a joined cluster, a warning (an autoscaler may add nodes)."""
    from pipeline.ray_utils import check_resources

    parts = ", ".join(f"{m.name} {m.autoscaling.min_replicas} x {m.cpus:g}" for m in cfg.models)
    check_resources({"CPU": replica_cpus(cfg)},
                    f"the Serve application (models[].cpus x autoscaling.min_replicas: {parts}; gateway_cpus "
                    f"{cfg.gateway_cpus:g})")


def smoke(url: str, cfg: ServeConfig) -> list[tuple[str, str]]:
    """One completion, one chat, one streamed completion, one classification and one feedback
    (greedy decoding with a frequency penalty: a small model left alone repeats itself)."""
    import os

    key = cfg.api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    served = requests.get(url + "/v1/models", headers=headers, timeout=30)
    served.raise_for_status()  # the kinds as served (a config may leave them to the checkpoints)
    kinds = {m["kind"]: m["id"] for m in reversed(served.json()["data"])}
    out = []

    def post(path, body):
        r = requests.post(url + path, json=body, headers=headers, timeout=120)
        r.raise_for_status()
        return r.json()

    lm = kinds.get("causal") or kinds.get("chat")
    if lm:
        c = post("/v1/completions", {"model": lm, "prompt": "The government said on Monday that", "max_tokens": 24,
                                     "temperature": 0.7, "top_p": 0.9, "seed": 1})
        out.append((f"completion ({lm})", c["choices"][0]["text"]))
        chunks = []
        streamed = {"model": lm, "prompt": "Shares in the company", "max_tokens": 24, "temperature": 0,
                    "frequency_penalty": 1.0, "stream": True}
        with requests.post(url + "/v1/completions", json=streamed, headers=headers, stream=True, timeout=120) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
        out.append((f"streamed ({len(chunks)} SSE chunks)", "".join(chunks)))
        fb = post("/v1/feedback", {"id": c["id"], "rating": cfg.rating_max, "comment": "demo feedback"})
        out.append(("feedback", f"{fb['status']} for {c['id']}"))
    if "chat" in kinds:
        c = post("/v1/chat/completions", {"model": kinds["chat"], "max_tokens": 32, "temperature": 0,
                                          "frequency_penalty": 1.0,
                                          "messages": [{"role": "user", "content": "How do I reset my password?"}]})
        out.append((f"chat ({kinds['chat']})", c["choices"][0]["message"]["content"]))
    if "classifier" in kinds:
        c = post("/v1/classify", {"model": kinds["classifier"],
                                  "input": "The striker scored twice as the home side won the cup final."})
        d = c["data"][0]
        out.append((f"classify ({kinds['classifier']})", f"{d['label']} (p={d['probabilities'][d['label']]:.2f})"))
    return out
