"""The serve job's command line and config files (ours and Serve's), and config errors."""

import pytest

from jobs.serve import parse_args
from pipeline.config import from_dict
from pipeline.serve.app import ServeConfig


def test_model_flags_name_kind_and_overrides():
    cfg, smoke = parse_args(["--model", "out/run/model", "--model", "chat=/m/sft:chat", "--model", "t=/m/clf:classifier",
                             "--port", "9000", "--api-key", "k", "request_timeout_s=5", "--smoke"])
    assert [(m.name, m.path, m.kind) for m in cfg.models] == [
        ("model", "out/run/model", None), ("chat", "/m/sft", "chat"), ("t", "/m/clf", "classifier")]  # None: read at start
    assert cfg.port == 9000 and cfg.api_key == "k" and cfg.request_timeout_s == 5 and smoke
    cfg, _ = parse_args(["--model", "/m/bloom", "models.0.context_length=2048"])  # a list element by index
    assert cfg.models[0].context_length == 2048


def test_serve_config_file_and_models_file_agree():
    a, _ = parse_args(["--config", "jobs/configs/serve_demo.yaml"])
    b, _ = parse_args(["--config", "jobs/configs/serve_models_demo.yaml"])
    assert a.models == b.models and a.host == "127.0.0.1" and a.port == 8000


@pytest.mark.parametrize("data,key", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "unique"),
    ({"models": [{"name": "a b", "path": "x"}]}, "name"),
    ({"models": [{"name": "a", "path": "x", "kind": "seq2seq"}]}, "kind"),
    ({"models": [{"name": "a", "path": "x", "autoscaling": {"min_replicas": 3, "max_replicas": 1}}]}, "min_replicas"),
    ({"models": [{"name": "a", "path": "x", "autoscaling": {"upscale_delay_s": -1}}]}, "upscale_delay_s"),
    ({"models": [{"name": "a", "path": "x", "autoscaling": {"upscale_delay": 1}}]}, "upscale_delay"),
    ({"models": [{"name": "a", "path": "x"}], "rating_min": 5, "rating_max": 1}, "rating_min"),
    ({"models": [{"name": "a", "path": "x", "max_batch": 4}]}, "max_batch"),
    ({"models": [{"name": "a", "path": "x", "context_length": 1}]}, "context_length"),
    ({"models": [{"name": "a", "path": "x", "context_length": "long"}]}, "context_length"),
    ({"models": [{"name": "a", "path": "x", "max_queue": 0}]}, "max_queue must be >= 1"),
    ({"models": [{"name": "a", "path": "x", "batch_wait_ms": -1}]}, "batch_wait_ms must be >= 0"),
    ({"models": [{"name": "a", "path": "x", "max_queued_requests": 0}]}, "max_queued_requests must be >= 1 or -1"),
    ({"models": [{"name": "a", "path": "x", "default_max_tokens": 0}]}, "default_max_tokens"),
    ({"models": [{"name": "a", "path": "x"}], "port": 99999}, r"port must be in \[1, 65535\]"),
    ({"models": [{"name": "a", "path": "x"}], "gateway_cpus": 0}, "gateway_cpus"),
    # an empty key (an unset shell variable) must not turn the key check off
    ({"models": [{"name": "a", "path": "x"}], "api_key": ""}, "api_key is empty"),
    ({"models": [{"name": "a", "path": "x"}], "api_key": "  "}, "api_key is empty"),
    ({"models": [{"name": "a", "path": "x"}], "host": ""}, "host must be set"),
    ({"models": [{"name": "a", "path": "x"}], "app_name": ""}, "app_name"),
    ({"models": [{"name": "a", "path": "x"}], "feedback_db": ""}, "feedback_db"),
])
def test_bad_serve_config_names_the_key(data, key):
    with pytest.raises(ValueError, match=key):
        from_dict(ServeConfig, data)


def test_kinds_are_read_from_the_checkpoint_and_mismatches_refused(tiny_models):
    """A model directory says what it is (--model DIR needs no kind); a kind that contradicts the
    checkpoint is refused before any replica starts (transformers would load either way: a random
    classification head, or a classifier's encoder generating text)."""
    from pipeline.serve.app import ServedModel, check_kind, infer_kind

    lm, chat, clf = (str(tiny_models / n) for n in ("lm", "chat", "clf"))
    assert (infer_kind(lm), infer_kind(chat), infer_kind(clf)) == ("causal", "chat", "classifier")
    assert infer_kind("jobs/configs/pretrain_demo.yaml") is None
    cfg, _ = parse_args(["--model", f"t={clf}", "--model", f"c={chat}", "--model", f"l={lm}"])
    assert [m.kind for m in cfg.models] == ["classifier", "chat", "causal"]
    for path, kind in ((lm, "causal"), (chat, "chat"), (clf, "classifier"), (str(tiny_models / "lm-int8"), "causal")):
        check_kind(ServedModel(name="m", path=path, kind=kind))
    with pytest.raises(ValueError, match="causal language model, not a sequence classifier"):
        check_kind(ServedModel(name="m", path=lm, kind="classifier"))
    with pytest.raises(ValueError, match="is a sequence classifier; serve it with kind: classifier"):
        check_kind(ServedModel(name="m", path=clf, kind="causal"))
    # a models YAML may leave the kind out too: it is read from the checkpoint when resolved
    from pipeline.serve.app import resolve_model

    assert [resolve_model(ServedModel(name="m", path=p)).kind for p in (lm, chat, clf, str(tiny_models / "lm-int8"))] \
        == ["causal", "chat", "classifier", "causal"]
    assert resolve_model(ServedModel(name="m", path=chat, kind="causal")).kind == "causal"  # a chat model as plain LM
    with pytest.raises(ValueError, match="is a sequence classifier; serve it with kind: classifier"):
        resolve_model(ServedModel(name="m", path=clf, kind="chat"))


def test_an_empty_completion_is_recorded_and_metrics_never_fail_a_request(ray_session, caplog):
    """A model whose first token is EOS completes with 0 tokens: Ray's Counter refuses inc(0),
    which once turned such answers into 500s. Any metrics failure is logged, not raised."""
    from pipeline.serve.app import _Metrics

    m = _Metrics()
    m._generation("m", 0.01, 0.02, 3, 0)  # raised ValueError("value must be >0") before the fix
    m._generation("m", 0.01, 0.05, 3, 4)

    def broken(*a, **k):
        raise RuntimeError("metrics backend down")

    m.ttft.observe = broken
    m.generation("m", 0.01, 0.02, 3, 2)
    assert "recording a generation failed" in caplog.text


def test_a_model_without_a_context_length_is_refused_before_serve_starts(tiny_models, tmp_path):
    """BLOOM (ALiBi) records no context length: without models[].context_length or a tokenizer
    that states one, the config is refused when it is resolved, naming the model and the key,
    not by a replica failing to start inside Serve."""
    import transformers

    from pipeline.serve.app import ServedModel, resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_models / "lm"))
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=len(tok), hidden_size=16, n_layer=1,
                                                                  n_head=2))
    bloom.save_pretrained(str(tmp_path / "bloom"))
    tok.model_max_length = int(1e30)  # transformers' "unknown"
    tok.save_pretrained(str(tmp_path / "bloom"))
    with pytest.raises(ValueError, match=r"models\[b\]: .*bloom.*names no context length.*context_length"):
        resolve_model(ServedModel(name="b", path=str(tmp_path / "bloom")))
    assert resolve_model(ServedModel(name="b", path=str(tmp_path / "bloom"), context_length=64)).kind == "causal"
    tok.model_max_length = 256
    tok.save_pretrained(str(tmp_path / "bloom"))
    assert resolve_model(ServedModel(name="b", path=str(tmp_path / "bloom"))).kind == "causal"


def test_replicas_the_local_cluster_cannot_hold_are_refused_before_serve_waits(ray_session, monkeypatch, caplog):
    """Nine models of 0.25 CPU and the gateway's 0.1 on a 2-CPU local cluster: Serve would wait
    for the ninth replica without end; the launcher says which keys add up, before deploying."""
    import logging

    from pipeline import ray_utils
    from pipeline.serve.launch import check_replica_resources, replica_cpus

    models = [{"name": f"m{i}", "path": "x"} for i in range(9)]
    cfg = from_dict(ServeConfig, {"models": models})
    assert replica_cpus(cfg) == pytest.approx(2.35)
    monkeypatch.setattr(ray_utils, "_LOCAL", True)
    with pytest.raises(ValueError, match=r"the Serve application \(models\[\]\.cpus x autoscaling\.min_replicas: "
                                         r"m0 1 x 0\.25, .*gateway_cpus 0\.1\) needs 2\.35 CPU \(the cluster has 2\)"):
        check_replica_resources(cfg)
    scaled = from_dict(ServeConfig, {"models": [{"name": "a", "path": "x", "cpus": 0.5,
                                                 "autoscaling": {"min_replicas": 2, "max_replicas": 3}}]})
    assert replica_cpus(scaled) == pytest.approx(1.1)
    check_replica_resources(scaled)  # fits
    monkeypatch.setattr(ray_utils, "_LOCAL", False)  # a joined cluster may autoscale: a warning
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_utils"):
        check_replica_resources(cfg)
    assert "needs 2.35 CPU (the cluster has 2): waiting for the cluster" in caplog.text


def test_stopping_ends_only_this_application_on_a_joined_cluster(monkeypatch):
    """On a cluster the job joined, stopping deletes its own application (serve.shutdown would end
    every other application on the cluster too); on the local cluster it started, Serve and Ray go.
    SIGTERM (``ray job stop``) unwinds like Ctrl-C, so that stop runs at all."""
    import os
    import signal

    import ray
    from ray import serve

    from pipeline.serve.launch import stop, stop_on_sigterm

    calls = []
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(("delete", name)))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append(("serve.shutdown",)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("ray.shutdown",)))
    cfg = from_dict(ServeConfig, {"models": [{"name": "a", "path": "x"}], "app_name": "mine"})
    stop(cfg, started_ray=False)
    assert calls == [("delete", "mine")]
    calls.clear()
    stop(cfg, started_ray=True)
    assert calls == [("serve.shutdown",), ("ray.shutdown",)]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
