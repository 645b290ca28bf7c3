"""A running Serve application on 127.0.0.1 (a free port) with tiny models: a causal LM, the same
model with a chat template, without KV cache, int8 and MLP-pruned, a small-queue copy for the
overload test, and a topic classifier. Tests talk to it over real HTTP."""

from __future__ import annotations

import socket
import time

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tiny_prepared, tmp_path_factory):
    import torch
    import transformers

    from pipeline.compress.prune import structured_prune
    from pipeline.compress.quantize import quantize_int8, save_int8
    from pipeline.finetune.sft import CHAT_TEMPLATE
    from pipeline.model.build import ModelConfig, build_model, hf_config

    run_dir, _ = tiny_prepared
    root = tmp_path_factory.mktemp("serve_models")
    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    model = build_model(ModelConfig(preset="tiny", max_seq_len=64), len(tok), tok.pad_token_id, tok.eos_token_id, seed=3)
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    chat_tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    chat_tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "chat")
    chat_tok.save_pretrained(root / "chat")
    calibration = [{"input_ids": torch.tensor([tok(t)["input_ids"]])}
                   for t in ("the market rose today", "the team won the final", "a new phone was sold")]
    save_int8(quantize_int8(transformers.AutoModelForCausalLM.from_pretrained(root / "lm"), calibration), tok,
              root / "lm-int8", "lm")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(root / "lm")
    structured_prune(pruned, mlp_keep=0.5)
    pruned.save_pretrained(root / "lm-pruned")
    tok.save_pretrained(root / "lm-pruned")
    config = hf_config(ModelConfig(preset="tiny", max_seq_len=64), len(tok), tok.pad_token_id, tok.eos_token_id)
    config.num_labels, config.id2label = 3, {0: "business", 1: "sport", 2: "tech"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    clf = transformers.AutoModelForSequenceClassification.from_config(config)
    clf.save_pretrained(root / "clf")
    tok.save_pretrained(root / "clf")
    return root


def serve_config(tiny_models, tmp, port: int, **over) -> dict:
    base = {"cpus": 0.05, "max_batch_size": 8, "batch_wait_ms": 30, "default_max_tokens": 16}
    return {
        "port": port, "feedback_db": str(tmp / "feedback.sqlite"), "gateway_cpus": 0.05, "request_timeout_s": 60,
        "models": [
            {"name": "tiny", "path": str(tiny_models / "lm"), **base},
            {"name": "tiny-chat", "path": str(tiny_models / "chat"), "kind": "chat", **base},
            {"name": "tiny-nocache", "path": str(tiny_models / "lm"), "kv_cache": False, **base},
            {"name": "tiny-int8", "path": str(tiny_models / "lm-int8"), **base},
            {"name": "tiny-pruned", "path": str(tiny_models / "lm-pruned"), **base},
            {"name": "tiny-busy", "path": str(tiny_models / "lm"), **{**base, "max_batch_size": 1, "max_queue": 1,
                                                                      "max_ongoing_requests": 2, "max_queued_requests": 1}},
            {"name": "topics", "path": str(tiny_models / "clf"), "kind": "classifier", **base},
            {"name": "tiny-scaling", "path": str(tiny_models / "lm"), **{**base, "max_batch_size": 1},
             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                             "upscale_delay_s": 0.5, "downscale_delay_s": 600}},
        ],
        **over,
    }


def deploy(cfg: dict, url: str) -> None:
    from ray import serve

    from pipeline.config import from_dict
    from pipeline.serve.app import ServeConfig, build_app

    serve.run(build_app(from_dict(ServeConfig, cfg)), name="llm", route_prefix="/")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("the Serve app did not become ready")


@pytest.fixture(scope="module")
def serve_app(ray_session, tiny_models, tmp_path_factory):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    cfg = serve_config(tiny_models, tmp_path_factory.mktemp("serve"), port)
    deploy(cfg, url)
    yield {"url": url, "config": cfg}
    serve.shutdown()  # frees the replicas' CPUs for the training tests that follow
