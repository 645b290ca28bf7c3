"""Request shapes of the HTTP API (OpenAI's for completions, chat and models) and OpenAI's error
JSON. Validation is strict: a wrong type, an out-of-range value or an unknown field is a 400
naming the parameter; OpenAI parameters this server does not implement are accepted only at
their neutral values."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

Number = StrictInt | StrictFloat


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    model: StrictStr | None = None  # default: the server's first model of the right kind
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)  # the newer name in chat
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt = Field(default=0, ge=-1)  # not in OpenAI's API; vLLM's extension: 0 or -1 = no cut
    stop: StrictStr | list[StrictStr] | None = None
    # a 64-bit seed, as vLLM takes (torch's generator refuses one past 2**64 - 1, which failed every
    # request batched with it); choice j of n samples with seed + j
    seed: StrictInt | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: StrictInt = Field(default=1, ge=1, le=16)  # choices per prompt (each a request to the model's batcher)
    # repetition penalties (engine.SamplingParams): OpenAI's two, and vLLM's repetition_penalty
    presence_penalty: Number = Field(default=0, ge=-2, le=2)
    frequency_penalty: Number = Field(default=0, ge=-2, le=2)
    repetition_penalty: Number = Field(default=1, gt=0, allow_inf_nan=False)
    # OpenAI's {"token id": bias}: added to the token's logit before sampling (-100 bans it, 100
    # forces it); ids past the model's vocabulary are a 400 from the model
    logit_bias: dict[str, Number] | None = None
    # vLLM's extensions (engine.SamplingParams): no EOS or stop string ends the text before
    # min_tokens (at most max_tokens); ignore_eos: generate through EOS (benchmark clients send it)
    min_tokens: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        # OpenAI's optional parameters are nullable ("temperature": null means the default), and
        # some clients send every parameter they know, unset ones as null
        if isinstance(data, dict):
            optional = {k for k, f in cls.model_fields.items() if not f.is_required()}
            data = {k: v for k, v in data.items() if not (v is None and k in optional)}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("top_k")
    @classmethod
    def _no_cut(cls, v):
        return max(v, 0)  # -1: vLLM's older spelling of "no top-k cut"

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens, got {len(v)}")
        for t, b in v.items():
            if not t.isdecimal() or not t.isascii():
                raise ValueError(f"keys must be token ids as strings, e.g. \"50256\", got {t!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"values must be in [-100, 100], got {b} for token {t}")
        return v


MAX_LOGIT_BIAS = 1024  # tokens biased in one request (OpenAI takes 300)
MAX_STOPS = 16  # OpenAI takes 4; evaluation harnesses send a task's stop strings and the EOS, often more
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5 in completions, 20 in chat)
MAX_PROMPTS = 32  # prompts x n in one completions request (each a request to the model's batcher)


class CompletionRequest(_Sampling):
    # a string, or token ids (as OpenAI's API allows; tokenizing clients such as evaluation
    # harnesses send them); a list holding one of either is the same prompt
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    # 0 with echo: score the prompt only (what evaluation harnesses send for log-likelihoods)
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    # each token's log-probability and its `logprobs` most likely alternatives; with echo, the
    # prompt's tokens too (the first one's is null)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = Field(default=False, validate_default=True)
    suffix: StrictStr | None = None  # text after the completion (insertion): only empty is accepted
    best_of: StrictInt = Field(default=1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v, info):
        # one prompt: a string or a list of token ids; several: a list of either (OpenAI's batch
        # form, what evaluation harnesses send), answered as one choice per prompt, in order
        prompts = v if isinstance(v, list) and not (v and all(isinstance(t, int) for t in v)) else [v]
        n = info.data.get("n", 1)
        if not prompts or len(prompts) * n > MAX_PROMPTS:
            raise ValueError(f"send 1 to {MAX_PROMPTS} prompts x n per request, got {len(prompts)} x {n}")
        for p in prompts:
            if not p:
                raise ValueError("prompt must not be empty")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError("token ids must be >= 0")
        return prompts[0] if len(prompts) == 1 else prompts

    @property
    def prompts(self) -> list:
        """The request's prompts: one, or several in the batch form."""
        batch = isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batch else [self.prompt]

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server (it completes text, it does not insert)")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v, info):
        if info.data.get("max_tokens") == 0 and not v:
            raise ValueError("max_tokens: 0 needs echo: true (the prompt is then scored or returned alone)")
        return v


class TextPart(_Strict):
    type: StrictStr
    text: StrictStr

    @field_validator("type")
    @classmethod
    def _text_only(cls, v):
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported by this server (text only)")
        return v


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system role; it reaches the template as "system"
    role: Literal["system", "developer", "user", "assistant"]
    # a string, or OpenAI's list of content parts (text parts only), joined with newlines
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    @field_validator("role")
    @classmethod
    def _developer(cls, v):
        return "system" if v == "developer" else v

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("content must not be an empty list")
            return "\n".join(p.text for p in v)
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI chat parameters that clients (LangChain, LiteLLM, ...) send at neutral values:
    # accepted there, a 400 that names them otherwise
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    logprobs: StrictBool = False  # each generated token's log-probability
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # and its alternatives (logprobs: true)
    store: StrictBool = False
    metadata: dict[str, StrictStr] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("response_format", "tools", "tool_choice", "store")
    @classmethod
    def _neutral_only(cls, v, info):
        name = info.field_name
        if name == "response_format" and v is not None and v.get("type") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported by this server (only 'text')")
        if name == "tools" and v:
            raise ValueError("tool calling is not supported by this server")
        if name == "tool_choice" and v not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported by this server (tool_choice: 'none' or 'auto' only)")
        if name == "store" and v:
            raise ValueError("store is not supported by this server (feedback: POST /v1/feedback)")
        return v


class PredictRequest(_Strict):
    text: StrictStr = Field(min_length=1)
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)


class ClassifyRequest(_Strict):
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_is_input(cls, data):
        # ``text``, the field /predict takes, names the input here too; one of the two, not both
        if isinstance(data, dict) and "text" in data:
            if "input" in data:
                raise ValueError("set input or text (the same field), not both")
            data = {("input" if k == "text" else k): v for k, v in data.items()}
        return data

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items or len(items) > 64:
            raise ValueError("input must hold 1 to 64 texts")
        if any(not t for t in items):
            raise ValueError("input texts must be non-empty")
        return items


class FeedbackRequest(_Strict):
    id: StrictStr = Field(min_length=1, max_length=128)
    rating: StrictInt
    comment: StrictStr | None = Field(default=None, max_length=4000)


def validation_error(exc) -> APIError:
    """A pydantic ValidationError (or FastAPI's RequestValidationError) as a 400 naming the field."""
    errors = exc.errors()
    # of a union's alternatives, the one that got furthest into the value is what the client meant
    # (a list of content parts that fails inside, not "should be a valid string")
    # (and of a number's int-or-float alternatives, float's "should be a valid number")
    first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") != "int_type")) if errors else {}
    tags = {"int", "float", "str", "bool", "dict", "list", "none", "json-or-python"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not (  # drop union member tags
        isinstance(p, str) and (p in tags or "[" in p or p.startswith(("function-", "constrained-"))))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown parameter {param!r}"
    elif first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", param=None, code="invalid_json")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param,
                    code="invalid_type" if "type" in first.get("type", "") else "invalid_value")
