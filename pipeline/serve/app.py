"""The Ray Serve application: one ``ModelServer`` deployment per model (engine + continuous batcher,
autoscaled on its own) behind one FastAPI ``Gateway`` ingress that validates requests, speaks
OpenAI's API, checks the API key, records metrics and stores responses and feedback.

    serve run jobs/configs/serve_demo.yaml          # Serve's config file, builder below
    python -m jobs.serve --model outputs/.../model  # the same app from the command line

Routes: GET /health, /ready, /v1/models, /v1/responses/{id}; POST /v1/completions,
/v1/chat/completions, /predict, /v1/classify, /v1/feedback."""


import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import Request

from pipeline.config import check, check_local

logger = logging.getLogger(__name__)

API_KEY_ENV = "PIPELINE_SERVE_API_KEY"


@dataclass(frozen=True, kw_only=True)
class AutoscalingCfg:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0  # load must stay above target this long before a replica is added
    downscale_delay_s: float = 30.0  # and below it this long before one is removed

    def __post_init__(self) -> None:
        check(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0,
              "autoscaling.upscale_delay_s and autoscaling.downscale_delay_s must be >= 0")
        check(1 <= self.min_replicas <= self.max_replicas,
              f"autoscaling: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        check(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests must be > 0")


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    name: str  # the ``model`` field clients send
    path: str  # model directory (HF safetensors or our int8 format), or a pretrain/finetune YAML
    # null: what the checkpoint is (a sequence classifier; else chat when its tokenizer has a chat
    # template; else causal)
    kind: Literal["causal", "chat", "classifier"] | None = None
    kv_cache: bool = True
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 32  # requests waiting inside a replica; beyond it: 503
    max_ongoing_requests: int = 16  # per replica (Serve)
    max_queued_requests: int = 64  # waiting for a replica (Serve); beyond it: 503
    default_max_tokens: int = 64
    context_length: int | None = None  # null: the model config's (set it for ALiBi models such as BLOOM)
    cpus: float = 0.25  # per replica
    threads: int = 1  # torch threads per replica
    autoscaling: AutoscalingCfg = field(default_factory=AutoscalingCfg)

    def __post_init__(self) -> None:
        check(bool(self.name) and self.name.replace("-", "").replace("_", "").replace(".", "").isalnum(),
              f"models[].name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        check_local(self.path, f"models[{self.name}].path")
        # every request waits in the replica's queue for the next batch, so a queue of 0 would refuse them all
        check(self.max_batch_size >= 1 and self.max_queue >= 1,
              f"models[{self.name}]: max_batch_size and max_queue must be >= 1, got {self.max_batch_size} and {self.max_queue}")
        check(self.batch_wait_ms >= 0, f"models[{self.name}].batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        check(self.max_ongoing_requests >= 1 and self.default_max_tokens >= 1,
              f"models[{self.name}]: max_ongoing_requests and default_max_tokens must be >= 1")
        check(self.max_queued_requests >= 1 or self.max_queued_requests == -1,
              f"models[{self.name}].max_queued_requests must be >= 1 or -1 (no limit), got {self.max_queued_requests}")
        check(self.cpus > 0 and self.threads >= 1, f"models[{self.name}]: cpus > 0 and threads >= 1")
        check(self.context_length is None or self.context_length >= 2,
              f"models[{self.name}].context_length must be >= 2 or null, got {self.context_length}")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    models: list[ServedModel] = field(default_factory=list)
    host: str = "127.0.0.1"  # loopback by default; 0.0.0.0 exposes the service
    port: int = 8000
    app_name: str = "llm"
    api_key: str | None = None  # Bearer key; default: $PIPELINE_SERVE_API_KEY; unset: no key checked
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 120.0
    feedback_db: str = "outputs/serve/feedback.sqlite"
    rating_min: int = 1
    rating_max: int = 5
    gateway_cpus: float = 0.1

    def __post_init__(self) -> None:
        check(bool(self.models), "models: list at least one model to serve")
        names = [m.name for m in self.models]
        check(len(set(names)) == len(names), f"models: names must be unique, got {names}")
        check(self.max_body_bytes > 0 and self.request_timeout_s > 0, "max_body_bytes and request_timeout_s must be > 0")
        check(self.rating_min < self.rating_max, "rating_min must be < rating_max")
        check(1 <= self.port <= 65535, f"port must be in [1, 65535], got {self.port}")
        check(self.gateway_cpus > 0, f"gateway_cpus must be > 0, got {self.gateway_cpus}")
        # an empty key (an unset shell variable, say) would otherwise fall back to no key at all
        check(self.api_key is None or bool(self.api_key.strip()),
              "api_key is empty: give a key, or leave it unset (null) to serve without one")
        check(bool(self.host.strip()), "host must be set (127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
        check(bool(self.app_name.strip()) and "/" not in self.app_name, f"app_name must be a plain name, got {self.app_name!r}")
        check(bool(self.feedback_db.strip()), "feedback_db must be a file path")


def check_kind(m: ServedModel) -> None:
    """The checkpoint at ``m.path`` is what ``m.kind`` serves: a causal LM read as a classifier
    would get a random head, a classifier read as an LM would generate from its encoder; both
    load without an error from ``transformers``."""
    from pipeline.model.build import checkpoint_kind, require_causal, require_classifier

    if m.kind == "classifier":
        require_classifier(m.path, f"models[{m.name}]")
        return
    check(checkpoint_kind(m.path) != "classifier",
          f"models[{m.name}]: {m.path} is a sequence classifier; serve it with kind: classifier")
    require_causal(m.path, f"models[{m.name}]", f"kind: {m.kind} (text generation)")


def infer_kind(path: str) -> str | None:
    """For a model directory: "classifier", "chat" (its tokenizer has a chat template) or
    "causal"; None when ``path`` is not a model directory (a YAML or compress reference)."""
    import json

    from pipeline.model.build import checkpoint_kind

    if not Path(path, "config.json").is_file():
        return None
    if checkpoint_kind(path) == "classifier":
        return "classifier"
    tok_cfg = Path(path, "tokenizer_config.json")
    has_template = Path(path, "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("chat_template")))
    return "chat" if has_template else "causal"


def resolve_model(m: ServedModel) -> ServedModel:
    """``m`` with its path resolved to a model directory, and its kind read from the checkpoint
    when the config leaves it out; checked (a kind the checkpoint cannot serve is refused)."""
    from dataclasses import replace

    path = resolve_path(m.path)
    m = replace(m, path=path, kind=m.kind or infer_kind(path) or "causal")
    check_kind(m)
    if m.kind != "classifier" and m.context_length is None:
        check_context(m)
    return m


def check_context(m: ServedModel) -> None:
    """A generating model states how many positions it has (or the serve config does): an ALiBi
    model such as BLOOM states none. Checked here, before any replica starts, so the error is one
    line naming the key rather than a failed deployment."""
    import transformers

    from pipeline.serve.engine import model_context

    config = transformers.AutoConfig.from_pretrained(m.path, local_files_only=True)
    try:
        model_context(config, transformers.AutoTokenizer.from_pretrained(m.path, local_files_only=True))
    except ValueError as e:
        raise ValueError(f"models[{m.name}]: {m.path}: {e}") from None


def resolve_path(spec: str) -> str:
    """A model directory; a pretrain / finetune YAML (its exported model); or
    ``compress.yaml#<model>-<variant>`` (a compressed variant)."""
    if "#" in spec:
        from pipeline.compress.run import resolve_variant

        path = resolve_variant(spec)
        check(Path(path, "config.json").exists(), f"models[].path: {spec} -> {path} does not exist (run the compress job)")
        return str(path)
    if spec.endswith((".yaml", ".yml")):
        from pipeline.compress.run import resolve_model

        return str(resolve_model(spec).resolve())
    check(Path(spec, "config.json").exists(), f"models[].path: {spec} is not a model directory (no config.json)")
    return str(Path(spec).resolve())


# ----------------------------------------------------------------------------------------------
# Model replicas
# ----------------------------------------------------------------------------------------------

class ModelServer:
    """One model in one replica. Methods return plain dicts; errors come back as
    ``{"error": {...}, "status": N}`` so the gateway can answer them in OpenAI's shape."""

    def __init__(self, spec: dict) -> None:
        import torch
        import transformers

        from pipeline.compress.quantize import load_model
        from pipeline.model.build import quiet_loading
        from pipeline.serve.batcher import DynamicBatcher
        from pipeline.serve.engine import Engine

        self.spec = ServedModel(**{**spec, "autoscaling": AutoscalingCfg(**spec.get("autoscaling", {}))})
        torch.set_num_threads(self.spec.threads)
        quiet_loading()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.spec.path, local_files_only=True,
                                                                    trust_remote_code=False)
        kind = "classifier" if self.spec.kind == "classifier" else "causal"
        self.model = load_model(self.spec.path, kind)
        self.batch_hist = None
        try:
            from ray.util.metrics import Histogram

            self.batch_hist = Histogram("llm_batch_size", description="requests per engine batch",
                                        boundaries=[1, 2, 4, 8, 16, 32], tag_keys=("model",))
        except Exception:  # metrics are best effort (no Ray worker context in unit tests)
            pass
        if kind == "causal":
            self.engine = Engine(self.model, self.tokenizer, max_batch_size=self.spec.max_batch_size,
                                 context_length=self.spec.context_length)
            self.batcher = DynamicBatcher(self.engine, max_batch_size=self.spec.max_batch_size,
                                          batch_wait_s=self.spec.batch_wait_ms / 1000, max_queue=self.spec.max_queue,
                                          use_cache=self.spec.kv_cache, on_batch=self._on_batch)
        logger.info("model %s (%s) loaded from %s", self.spec.name, self.spec.kind, self.spec.path)

    def _on_batch(self, size: int) -> None:
        if self.batch_hist is not None:
            self.batch_hist.observe(size, tags={"model": self.spec.name})

    async def info(self) -> dict:
        from pipeline.model.build import context_length

        ctx = self.engine.context_length if hasattr(self, "engine") else \
            self.spec.context_length or context_length(self.model.config, default=0) or None
        return {"name": self.spec.name, "kind": self.spec.kind, "context_length": ctx,
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
                "labels": [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
                if self.spec.kind == "classifier" else None}

    def _prompt(self, req: dict) -> str:
        if "messages" in req:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"model {self.spec.name} has no chat template; use /v1/completions")
            return self.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
        return req["prompt"]

    def _params(self, req: dict):
        from pipeline.serve.engine import SamplingParams

        top = _top_logprobs(req)
        max_tokens = req.get("max_tokens")
        return SamplingParams(max_tokens=self.spec.default_max_tokens if max_tokens is None else max_tokens,
                              temperature=float(req.get("temperature", 1.0)), top_p=float(req.get("top_p", 1.0)),
                              top_k=int(req.get("top_k", 0)), stop=tuple(req.get("stop") or ()),
                              seed=req.get("seed"), logprobs=top, prompt_logprobs=self._prompt_logprobs(req, top),
                              logit_bias=self._logit_bias(req.get("logit_bias") or {}),
                              min_tokens=int(req.get("min_tokens", 0)), ignore_eos=bool(req.get("ignore_eos", False)),
                              **{k: float(req[k]) for k in ("presence_penalty", "frequency_penalty", "repetition_penalty")
                                 if k in req})

    def _logit_bias(self, bias: dict) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``{"token id": value}`` as (id, value) pairs, ids within the vocabulary."""
        pairs = tuple(sorted((int(t), float(v)) for t, v in bias.items()))
        self._checked_ids([t for t, _ in pairs], "logit_bias")
        return pairs

    @staticmethod
    def _prompt_logprobs(req: dict, top: int | None) -> int | None:
        """Echo with logprobs scores the prompt; echo with max_tokens 0 alone runs the prefill only."""
        if not req.get("echo") or "messages" in req:
            return None
        return top if top is not None else (0 if req.get("max_tokens") == 0 else None)

    def _logprob_entries(self, entries, limit: int | None = None, eos: bool = True) -> list[dict] | None:
        """Engine log-probabilities as ``{"token", "logprob", "top": [[token, logprob], ...]}``,
        tokens as text; ``limit``: only the tokens that start within the first ``limit``
        characters of the completion (a stop string cut the rest), and the EOS that ended it if
        ``eos`` (OpenAI's completions list it; lm-evaluation-harness drops the last entry, the
        generated token, when it scores a prompt)."""
        if entries is None:
            return None
        out, used = [], 0
        for k, (tok, lp, top) in enumerate(entries):
            ended = tok in self.engine.stop_ids and k == len(entries) - 1
            if ended and not eos:
                break
            if limit is not None and used >= limit and not ended:
                break
            out.append(self._logprob_entry(tok, lp, top))
            used += len(out[-1]["token"])
        return out

    def _logprob_entry(self, tok: int, lp: float | None, top) -> dict:
        return {"token": self.tokenizer.decode([tok]), "logprob": lp,
                "top": None if top is None else [[self.tokenizer.decode([t]), v] for t, v in top]}

    def _streamed_logprobs(self, entries: list, limit: int, cursor: list[int]) -> list[dict]:
        """The entries of ``entries`` (a generation's so far) that ``_logprob_entries`` lists for a
        text of which ``limit`` characters are sent, after the ``cursor[0]`` already streamed
        (``cursor`` = [entries sent, their characters], advanced). An EOS waits for the end, where
        the rest of the final list follows; so the streamed entries add up to the non-streamed list."""
        out = []
        while cursor[0] < len(entries) and cursor[1] < limit and entries[cursor[0]][0] not in self.engine.stop_ids:
            out.append(self._logprob_entry(*entries[cursor[0]]))
            cursor[0], cursor[1] = cursor[0] + 1, cursor[1] + len(out[-1]["token"])
        return out

    async def generate_stream(self, req: dict, stream: bool = True):
        """Yields ``{"delta": str}`` events (only with ``stream``), then one final dict with finish
        reason and usage."""
        from pipeline.serve.batcher import Overloaded

        if self.spec.kind == "classifier":
            yield _err(400, f"model {self.spec.name} is a classifier; use /v1/classify", "model")
            return
        try:
            prompt = self._prompt(req)
            if isinstance(prompt, list):  # token ids
                ids = self._checked_ids(prompt)
                prompt = self.tokenizer.decode(ids)
            else:
                ids = self.engine.encode(prompt)
            params = self._params(req)
            events = await self.batcher.submit(ids, params, stream=stream)
        except Overloaded as e:
            yield _err(503, f"model {self.spec.name} is overloaded: {e}", type="overloaded", code="overloaded")
            return
        except ValueError as e:  # the message names its parameter first ("prompt: ...") or is the context's
            msg = str(e)
            named = next((p for p in ("prompt", "logit_bias", "min_tokens") if msg.startswith(p + ":")), None)
            yield _err(400, msg, "max_tokens" if "exceeds" in msg else named,
                       code="context_length_exceeded" if "exceeds" in msg else None)
            return
        sampled, cursor, sent_chars = [], [0, 0], 0  # streamed log-probabilities (see _streamed_logprobs)
        echo = stream and bool(req.get("echo")) and "messages" not in req  # the prompt's text streams first
        async for ev in events:
            if echo:  # once prefilled: before the first generated text, or the end (max_tokens 0)
                echo = False
                scored = ev.generation.prompt_logprobs if ev.generation is not None else ev.prompt_logprobs
                yield {"delta": prompt, **({} if params.logprobs is None else
                                           {"logprobs": self._logprob_entries(scored or [])})}
            if ev.delta:
                if ev.logprobs is None:
                    yield {"delta": ev.delta}
                else:
                    sampled += ev.logprobs
                    sent_chars += len(ev.delta)
                    yield {"delta": ev.delta, "logprobs": self._streamed_logprobs(sampled, sent_chars, cursor)}
            if ev.finished:
                g = ev.generation
                final = {"finished": True, "text": g.text, "finish_reason": g.finish_reason, "prompt": prompt,
                         "prompt_tokens": len(ids), "completion_tokens": len(g.token_ids),
                         "batch_size": ev.batch_size, "ttft_s": ev.queued_s + (g.first_token_s or 0.0)}
                if params.logprobs is not None:
                    final["logprobs"] = self._logprob_entries(g.logprobs or [], len(g.text), eos="messages" not in req)
                    final["prompt_logprobs"] = self._logprob_entries(g.prompt_logprobs)
                    if stream:  # what the text's chunks did not carry: held-back tokens, the EOS
                        final["logprobs_rest"] = final["logprobs"][cursor[0]:]
                yield final

    def _checked_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.engine.vocab]
        if bad:
            raise ValueError(f"{param}: token id {bad[0]} is outside this model's vocabulary (0-{self.engine.vocab - 1})")
        return ids

    async def generate(self, req: dict) -> dict:
        out = {}
        async for ev in self.generate_stream(req, stream=False):
            if "error" in ev or ev.get("finished"):
                out = ev
        return out

    async def classify(self, texts: list[str]) -> dict:
        if self.spec.kind != "classifier":
            return _err(400, f"model {self.spec.name} is not a classifier", "model")
        return await asyncio.get_running_loop().run_in_executor(None, self._classify, texts)

    def _classify(self, texts: list[str]) -> dict:
        from pipeline.evaluate.classify import classify_probs

        labels = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        # the reading saved with the classifier (window length, windows), as evaluation uses it
        probs, tokens = classify_probs(self.model, self.tokenizer, texts)
        return {"data": [{"index": i, "label": labels[int(p.argmax())],
                          "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p)}}
                         for i, p in enumerate(probs)],
                "usage": {"prompt_tokens": tokens}}


def _top_logprobs(req: dict) -> int | None:
    """Alternatives per token the request asks log-probabilities for; None: no log-probabilities.
    Completions send ``logprobs: n``; chat sends ``logprobs: true`` and ``top_logprobs: n``."""
    if "messages" in req:
        return int(req.get("top_logprobs") or 0) if req.get("logprobs") else None
    return req.get("logprobs")


def completion_logprobs(entries: list[dict], start: int = 0) -> dict:
    """OpenAI's legacy completions shape: tokens, their log-probabilities, the most likely
    alternatives with the chosen token among them, and each token's offset in the text (the
    first at ``start``: a streamed chunk's entries continue the text before them)."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {**{t: v for t, v in e["top"]}, e["token"]: e["logprob"]}
                             for e in entries],
            "text_offset": offsets}


def completion_choice(index: int, out: dict, echo: bool) -> dict:
    """One choice of a completions response from a model replica's answer ``out``: with ``echo``
    the prompt comes first, in the text and, with logprobs, in the token lists."""
    logprobs = None
    if "logprobs" in out:
        logprobs = completion_logprobs(((out["prompt_logprobs"] or []) if echo else []) + out["logprobs"])
    return {"index": index, "text": (out["prompt"] if echo else "") + out["text"],
            "finish_reason": out["finish_reason"], "logprobs": logprobs}


def chat_logprobs(entries: list[dict]) -> dict:
    """OpenAI's chat shape: ``content``, one record per generated token."""
    def record(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**record(e["token"], e["logprob"]), "top_logprobs": [record(t, v) for t, v in e["top"]]}
                        for e in entries], "refusal": None}


def _err(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
         code: str | None = None) -> dict:
    return {"status": status, "error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# HTTP gateway
# ----------------------------------------------------------------------------------------------

def make_fastapi(cfg: ServeConfig):
    """The FastAPI app, with middleware and error handlers; routes are added by ``Gateway``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pipeline.serve.api import APIError, validation_error

    app = FastAPI(title="pipeline LLM service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = validation_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(APIError(exc.status_code, msg, type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    return app


class Gateway:
    """Routes, auth, limits, metrics and the feedback store. ``handles`` maps model names to
    ``ModelServer`` deployment handles."""

    def __init__(self, cfg: dict, handles: dict) -> None:
        from pipeline.config import from_dict
        from pipeline.serve.feedback import FeedbackStore

        self.cfg = from_dict(ServeConfig, cfg)
        self.handles = handles
        self.kinds = {m.name: m.kind for m in self.cfg.models}
        self.api_key = self.cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.store = FeedbackStore(self.cfg.feedback_db)
        self.created = int(time.time())
        self.metrics = _Metrics()

    # -- helpers ------------------------------------------------------------------------------
    def pick_model(self, name: str | None, kinds: tuple[str, ...]) -> str:
        from pipeline.serve.api import APIError

        if name is None:
            for m in self.cfg.models:
                if m.kind in kinds:
                    return m.name
            raise APIError(400, f"no {' or '.join(kinds)} model is served; name one in 'model'", param="model")
        if name not in self.kinds:
            raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists them",
                           type="not_found_error", param="model", code="model_not_found")
        if self.kinds[name] not in kinds:
            raise APIError(400, f"model {name!r} is a {self.kinds[name]} model; this route needs "
                                f"{' or '.join(kinds)}", param="model")
        return name

    async def call(self, coro):
        """Await a handle call within the request timeout; Serve back-pressure becomes a 503."""
        from ray.serve.exceptions import BackPressureError

        from pipeline.serve.api import APIError

        try:
            return await asyncio.wait_for(coro, self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request took longer than {self.cfg.request_timeout_s}s", type="timeout",
                           code="timeout") from None
        except BackPressureError as e:
            raise APIError(503, f"the service is overloaded, retry later ({e})", type="overloaded",
                           code="overloaded") from None

    @staticmethod
    def raise_if_error(out: dict) -> None:
        from pipeline.serve.api import APIError

        if "error" in out:
            e = out["error"]
            raise APIError(out.get("status", 500), e["message"], e.get("type", "invalid_request_error"),
                           e.get("param"), e.get("code"))

    def sampling(self, req) -> dict:
        d = req.model_dump(exclude_none=True)
        if getattr(req, "max_completion_tokens", None) and not getattr(req, "max_tokens", None):
            d["max_tokens"] = req.max_completion_tokens
        return d

    async def record(self, **kw) -> None:
        try:
            await asyncio.to_thread(self.store.record_response, **kw)
        except Exception:
            logger.exception("could not record response %s", kw.get("id"))


class _Metrics:
    """Ray metrics (exported on Ray's Prometheus endpoint) for the gateway."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        latency = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
        self.requests = Counter("llm_requests_total", description="HTTP requests by route, status and model",
                                tag_keys=("route", "status", "model"))
        self.latency = Histogram("llm_request_latency_seconds", description="request latency", boundaries=latency,
                                 tag_keys=("route", "model"))
        self.ttft = Histogram("llm_time_to_first_token_seconds", description="time to first token",
                              boundaries=latency, tag_keys=("model",))
        self.tpot = Histogram("llm_time_per_output_token_seconds", description="time per output token after the first",
                              boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
                              tag_keys=("model",))
        self.tokens = Counter("llm_tokens_generated_total", description="completion tokens generated",
                              tag_keys=("model",))
        self.prompt_tokens = Counter("llm_prompt_tokens_total", description="prompt tokens processed",
                                     tag_keys=("model",))

    def request(self, route: str, status: int, model: str, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status), "model": model})
        self.latency.observe(seconds, tags={"route": route, "model": model})

    def generation(self, model: str, ttft: float, total: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Record one finished generation; a failure here is logged, never the request's failure."""
        try:
            self._generation(model, ttft, total, prompt_tokens, completion_tokens)
        except Exception:  # noqa: BLE001 - the answer is already computed; the client gets it
            logger.exception("metrics: recording a generation failed")

    def _generation(self, model: str, ttft: float, total: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.ttft.observe(ttft, tags={"model": model})
        if completion_tokens > 1:
            self.tpot.observe(max(0.0, total - ttft) / (completion_tokens - 1), tags={"model": model})
        # Ray's Counter.inc refuses 0: a completion can be empty (the model's first token is EOS)
        if completion_tokens > 0:
            self.tokens.inc(completion_tokens, tags={"model": model})
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens, tags={"model": model})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _gateway_class(cfg: ServeConfig):
    """The ingress deployment class around a FastAPI app built for this config."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from ray import serve

    from pipeline.serve import api

    app = make_fastapi(cfg)

    @serve.deployment(name="gateway", ray_actor_options={"num_cpus": cfg.gateway_cpus},
                      max_ongoing_requests=1000)
    @serve.ingress(app)
    class GatewayDeployment(Gateway):
        async def _guard(self, request: Request, schema=None, route: str = ""):
            """API key, body size, JSON and schema checks: the validated request or an APIError."""
            if self.api_key is not None:
                auth = request.headers.get("authorization", "")
                if auth != f"Bearer {self.api_key}":
                    raise api.APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                       type="authentication_error", code="invalid_api_key")
            if schema is None:
                return None
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
                raise api.APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.cfg.max_body_bytes:
                    raise api.APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large")
            try:
                data = json.loads(bytes(body).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise api.APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
            if not isinstance(data, dict):
                raise api.APIError(400, "the request body must be a JSON object", code="invalid_json")
            try:
                return schema.model_validate(data)
            except ValidationError as e:
                raise api.validation_error(e) from None

        async def _observe(self, route: str, ctx: dict, started: float, fn):
            status = 500
            try:
                resp = await fn()
                status = resp.status_code
                return resp
            except api.APIError as e:
                status = e.status
                raise
            finally:
                self.metrics.request(route, status, ctx.get("model", "-"), time.perf_counter() - started)

        # -- health --------------------------------------------------------------------------
        @app.get("/health")
        async def health(self):
            return {"status": "ok"}

        @app.get("/ready")
        async def ready(self):
            try:
                infos = await asyncio.wait_for(asyncio.gather(*[h.info.remote() for h in self.handles.values()]), 5)
            except Exception as e:
                return JSONResponse({"status": "loading", "detail": type(e).__name__}, status_code=503)
            return {"status": "ready", "models": [i["name"] for i in infos]}

        # -- models --------------------------------------------------------------------------
        @app.get("/v1/models")
        async def models(self, request: Request):
            await self._guard(request)
            return {"object": "list", "data": [self._model_card(m) for m in self.cfg.models]}

        @app.get("/v1/models/{name:path}")
        async def model(self, name: str, request: Request):
            await self._guard(request)
            for m in self.cfg.models:
                if m.name == name:
                    return self._model_card(m)
            raise api.APIError(404, f"the model {name!r} does not exist; GET /v1/models lists them",
                               type="not_found_error", param="model", code="model_not_found")

        def _model_card(self, m) -> dict:
            return {"id": m.name, "object": "model", "created": self.created, "owned_by": "pipeline", "kind": m.kind}

        # -- generation ----------------------------------------------------------------------
        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._generate(request, api.CompletionRequest, "/v1/completions", chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._generate(request, api.ChatRequest, "/v1/chat/completions", chat=True)

        async def _generate(self, request: Request, schema, route: str, chat: bool):
            started = time.perf_counter()
            ctx: dict = {}

            async def run():
                req = await self._guard(request, schema, route)
                model = ctx["model"] = self.pick_model(req.model, ("chat", "causal") if chat else ("causal", "chat"))
                payload = self.sampling(req)
                payload.pop("model", None)
                if chat:
                    payload["messages"] = [m.model_dump(exclude_none=True) for m in req.messages]
                rid = new_id("chatcmpl" if chat else "cmpl")
                handle = self.handles[model]
                # n choices per prompt, and completions' batch form: one model request per choice (the
                # replica's batcher runs them together), choice k = prompt k // n, in order; with a
                # seed, choice j of a prompt samples with seed + j; any error answers the whole request
                prompts = [None] if chat else req.prompts
                payloads = [{**payload, **({} if p is None else {"prompt": p}),
                             **({"seed": payload["seed"] + j} if j and payload.get("seed") is not None else {})}
                            for p in prompts for j in range(req.n)]
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    gens = [handle.options(stream=True).generate_stream.remote(p) for p in payloads]
                    try:  # errors (400/503) before the stream starts
                        firsts = await asyncio.gather(*(self.call(g.__anext__()) for g in gens))
                        for first in firsts:
                            self.raise_if_error(first)
                    except BaseException:
                        for g in gens:
                            g.cancel()
                        raise
                    return StreamingResponse(self._sse(gens, firsts, req.n, rid, model, chat, include_usage, started,
                                                       route), media_type="text/event-stream",
                                             headers={"X-Response-Id": rid})
                outs = await asyncio.gather(*(self.call(handle.generate.remote(p)) for p in payloads))
                for out in outs:
                    self.raise_if_error(out)
                total = time.perf_counter() - started
                n_prompt = sum(o["prompt_tokens"] for o in outs[::req.n])  # each prompt counted once
                n_completion = sum(o["completion_tokens"] for o in outs)
                self.metrics.generation(model, min(o["ttft_s"] for o in outs), total, n_prompt, n_completion)
                one = len(outs) == 1
                await self.record(id=rid, route=route, model=model,  # several prompts: JSON lists
                                  prompt=outs[0]["prompt"] if one else json.dumps([o["prompt"] for o in outs]),
                                  completion=outs[0]["text"] if one else json.dumps([o["text"] for o in outs]),
                                  finish_reason=",".join(o["finish_reason"] for o in outs), prompt_tokens=n_prompt,
                                  completion_tokens=n_completion, latency_s=total)
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                         "total_tokens": n_prompt + n_completion}
                if chat:
                    choices = [{"index": k, "message": {"role": "assistant", "content": out["text"]},
                                "finish_reason": out["finish_reason"],
                                "logprobs": chat_logprobs(out["logprobs"]) if "logprobs" in out else None}
                               for k, out in enumerate(outs)]
                    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                            "choices": choices, "usage": usage}
                else:
                    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                            "choices": [completion_choice(i, out, req.echo) for i, out in enumerate(outs)],
                            "usage": usage}
                return JSONResponse(body, headers={"X-Response-Id": rid,
                                                   "X-Batch-Size": str(max(o["batch_size"] for o in outs))})

            return await self._observe(route, ctx, started, run)

        async def _sse(self, gens, firsts, n, rid, model, chat, include_usage, started, route):
            """Server-sent events of the choices' streams (choice k of the model request ``gens[k]``,
            whose first event is ``firsts[k]``), interleaved as their tokens come, each chunk
            naming its choice's index; each choice ends with a chunk with its finish reason, the
            response with the usage chunk (``include_usage``) and ``[DONE]``."""
            created = int(time.time())
            obj = "chat.completion.chunk" if chat else "text_completion"
            offsets = [0] * len(gens)  # per choice: characters its streamed logprobs' tokens cover

            def logprobs(k: int, entries: list[dict] | None) -> dict | None:
                if entries is None:
                    return None
                if chat:
                    return chat_logprobs(entries)
                out = completion_logprobs(entries, offsets[k])
                offsets[k] += sum(len(e["token"]) for e in entries)
                return out

            def chunk(k: int, delta_text: str | None, finish: str | None, role: bool = False,
                      lps: list | None = None) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else \
                        ({"content": delta_text} if delta_text is not None else {})
                    choice = {"index": k, "delta": delta, "finish_reason": finish, "logprobs": logprobs(k, lps)}
                else:
                    choice = {"index": k, "text": delta_text or "", "finish_reason": finish, "logprobs": logprobs(k, lps)}
                return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

            events: asyncio.Queue = asyncio.Queue()

            async def pump(k: int) -> None:  # choice k's events into the shared queue, ending with a final one
                event = firsts[k]
                try:
                    while True:
                        await events.put((k, event))
                        if "error" in event or event.get("finished"):
                            return
                        event = await asyncio.wait_for(gens[k].__anext__(), self.cfg.request_timeout_s)
                except StopAsyncIteration:
                    await events.put((k, api.APIError(500, "generation ended early", type="server_error").body()))
                except asyncio.TimeoutError:
                    await events.put((k, api.APIError(504, "generation timed out", type="timeout", code="timeout").body()))
                except asyncio.CancelledError:
                    raise
                except Exception:  # the replica failed mid-stream: say so in the stream, no stack trace
                    logger.exception("stream %s failed", rid)
                    await events.put((k, api.APIError(500, "generation failed", type="server_error").body()))

            pumps = [asyncio.create_task(pump(k)) for k in range(len(gens))]
            finals: dict[int, dict] = {}
            ttft = None
            try:
                if chat:
                    for k in range(len(gens)):
                        yield sse(chunk(k, None, None, role=True))
                while len(finals) < len(gens):
                    k, event = await events.get()
                    if "error" in event:  # one choice failed: the response ends with its error
                        yield sse({"error": event["error"]})
                        break
                    if "delta" in event:
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        yield sse(chunk(k, event["delta"], None, lps=event.get("logprobs")))
                    if event.get("finished"):
                        finals[k] = event
                        yield sse(chunk(k, None if chat else "", event["finish_reason"], lps=event.get("logprobs_rest")))
                if len(finals) == len(gens):
                    total = time.perf_counter() - started
                    outs = [finals[k] for k in range(len(gens))]
                    n_prompt = sum(o["prompt_tokens"] for o in outs[::n])  # each prompt counted once
                    n_completion = sum(o["completion_tokens"] for o in outs)
                    if include_usage:
                        yield sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                   "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                                             "total_tokens": n_prompt + n_completion}})
                    self.metrics.generation(model, ttft if ttft is not None else total, total, n_prompt, n_completion)
                    one = len(outs) == 1
                    await self.record(id=rid, route=route, model=model,
                                      prompt=outs[0]["prompt"] if one else json.dumps([o["prompt"] for o in outs]),
                                      completion=outs[0]["text"] if one else json.dumps([o["text"] for o in outs]),
                                      finish_reason=",".join(o["finish_reason"] for o in outs),
                                      prompt_tokens=n_prompt, completion_tokens=n_completion, latency_s=total)
            finally:  # the client left, or a choice failed: stop the others' generation
                for task in pumps:
                    task.cancel()
                for k, g in enumerate(gens):
                    if k not in finals:
                        g.cancel()
            yield sse("[DONE]")

        # -- the seed's route ----------------------------------------------------------------
        @app.post("/predict")
        async def predict(self, request: Request):
            started, ctx = time.perf_counter(), {}

            async def run():
                req = await self._guard(request, api.PredictRequest, "/predict")
                model = ctx["model"] = self.pick_model(req.model, ("causal", "chat"))
                payload = {"prompt": req.text, "temperature": 0.0}
                if req.max_tokens:
                    payload["max_tokens"] = req.max_tokens
                out = await self.call(self.handles[model].generate.remote(payload))
                self.raise_if_error(out)
                rid = new_id("pred")
                await self.record(id=rid, route="/predict", model=model, prompt=req.text, completion=out["text"],
                                  finish_reason=out["finish_reason"], prompt_tokens=out["prompt_tokens"],
                                  completion_tokens=out["completion_tokens"], latency_s=time.perf_counter() - started)
                return JSONResponse({"id": rid, "response": out["text"], "model": model}, headers={"X-Response-Id": rid})

            return await self._observe("/predict", ctx, started, run)

        # -- classification ------------------------------------------------------------------
        @app.post("/v1/classify")
        async def classify(self, request: Request):
            started, ctx = time.perf_counter(), {}

            async def run():
                req = await self._guard(request, api.ClassifyRequest, "/v1/classify")
                model = ctx["model"] = self.pick_model(req.model, ("classifier",))
                out = await self.call(self.handles[model].classify.remote(req.input))
                self.raise_if_error(out)
                rid = new_id("clf")
                await self.record(id=rid, route="/v1/classify", model=model, prompt=json.dumps(req.input),
                                  completion=json.dumps([d["label"] for d in out["data"]]), finish_reason=None,
                                  prompt_tokens=out["usage"]["prompt_tokens"], completion_tokens=0,
                                  latency_s=time.perf_counter() - started)
                return JSONResponse({"id": rid, "object": "classification", "created": int(time.time()),
                                     "model": model, **out}, headers={"X-Response-Id": rid})

            return await self._observe("/v1/classify", ctx, started, run)

        # -- feedback ------------------------------------------------------------------------
        @app.post("/v1/feedback")
        async def feedback(self, request: Request):
            started, ctx = time.perf_counter(), {}

            async def run():
                req = await self._guard(request, api.FeedbackRequest, "/v1/feedback")
                if not self.cfg.rating_min <= req.rating <= self.cfg.rating_max:
                    raise api.APIError(400, f"rating must be an integer from {self.cfg.rating_min} to "
                                            f"{self.cfg.rating_max}", param="rating")
                fid = await asyncio.to_thread(self.store.add_feedback, req.id, req.rating, req.comment)
                if fid is None:
                    raise api.APIError(404, f"no response has the id {req.id!r}", type="not_found_error", param="id")
                return JSONResponse({"object": "feedback", "id": fid, "response_id": req.id, "status": "stored"})

            return await self._observe("/v1/feedback", ctx, started, run)

        @app.get("/v1/responses/{response_id}")
        async def response(self, response_id: str, request: Request):
            await self._guard(request)
            row = await asyncio.to_thread(self.store.get, response_id)
            if row is None:
                raise api.APIError(404, f"no response has the id {response_id!r}", type="not_found_error", param="id")
            return row

    return GatewayDeployment


def build_app(cfg: ServeConfig):
    """The bound Serve application for ``serve.run`` / ``serve run``."""
    from dataclasses import asdict, replace

    from ray import serve

    cfg = replace(cfg, models=[resolve_model(m) for m in cfg.models],  # checked before any replica starts
                  feedback_db=str(Path(cfg.feedback_db).resolve()))
    handles = {}
    for m in cfg.models:
        a = m.autoscaling
        scaling = {"num_replicas": 1} if a.min_replicas == a.max_replicas == 1 else {
            "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": a.target_ongoing_requests,
                                   "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}}
        dep = serve.deployment(ModelServer, name=f"model-{m.name}", ray_actor_options={"num_cpus": m.cpus},
                               max_ongoing_requests=m.max_ongoing_requests,
                               max_queued_requests=m.max_queued_requests, health_check_period_s=5, **scaling)
        handles[m.name] = dep.bind(asdict(m))
    from pipeline.config import to_dict

    return _gateway_class(cfg).bind(to_dict(cfg), handles)


def app_builder(args: dict):
    """``serve run`` entry (``import_path: pipeline.serve.app:app_builder``): ``args`` is either
    ``{"config": "serve_models.yaml"}`` or the ServeConfig keys inline."""
    from pipeline.config import from_dict, load_yaml

    data = dict(args)
    if "config" in data:
        data = {**load_yaml(data.pop("config")), **data}
    return build_app(from_dict(ServeConfig, data))
