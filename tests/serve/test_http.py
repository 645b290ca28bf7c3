"""The Serve application over real HTTP on 127.0.0.1: every route, OpenAI shapes, SSE, stop
strings, seeds, KV cache vs no cache, batching, errors, overload, API key, durable feedback."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serve.conftest import deploy

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def whole_app(serve_app):
    """The restart test (last in this module) leaves a one-model app behind; any test run after
    it gets the whole application back first."""
    if serve_app.pop("reduced", False):
        deploy(serve_app["config"], serve_app["url"])


def post(app, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(app["url"] + path, data=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                         timeout=60, **kw)


def complete(app, **body):
    r = post(app, "/v1/completions", {"model": "tiny", "prompt": "the market", "max_tokens": 12, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param:
        assert err["param"] == param, err


def test_health_ready_models(serve_app):
    assert requests.get(serve_app["url"] + "/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(serve_app["url"] + "/ready", timeout=10).json()["status"] == "ready"
    data = requests.get(serve_app["url"] + "/v1/models", timeout=10).json()
    assert data["object"] == "list" and {m["id"] for m in data["data"]} >= {"tiny", "tiny-chat", "topics"}
    assert all(m["object"] == "model" for m in data["data"])
    card = requests.get(serve_app["url"] + "/v1/models/tiny-chat", timeout=10).json()  # OpenAI's retrieve
    assert card == next(m for m in data["data"] if m["id"] == "tiny-chat")
    assert_openai_error(requests.get(serve_app["url"] + "/v1/models/nope", timeout=10), 404, param="model")


def test_completion_shape_and_usage(serve_app):
    r = complete(serve_app)
    body = r.json()
    assert body["id"].startswith("cmpl-") and r.headers["X-Response-Id"] == body["id"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 12
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_token_id_prompts_answer_as_their_text(serve_app):
    """OpenAI's API takes a prompt as token ids too (tokenizing clients send them): the same
    tokens give the same greedy answer as the text, alone or as a list of one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_app["config"]["models"][0]["path"])
    ids = tok("the market", add_special_tokens=False)["input_ids"]
    text = complete(serve_app).json()
    for prompt in (ids, [ids]):
        body = complete(serve_app, prompt=prompt).json()
        assert body["choices"][0]["text"] == text["choices"][0]["text"]
        assert body["usage"]["prompt_tokens"] == len(ids) == text["usage"]["prompt_tokens"]


def test_logprobs_and_echo_score_a_prompt_as_evaluation_harnesses_ask(serve_app):
    """What lm-evaluation-harness's completions backend sends for a log-likelihood: token ids,
    echo, logprobs, temperature 0. The prompt's tokens come back with the model's log-probabilities
    (the first null), then the generated token's, each with its most likely alternatives; with
    max_tokens 0 the prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = serve_app["config"]["models"][0]["path"]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = tok("shares in the company rose", add_special_tokens=False)["input_ids"]
    body = complete(serve_app, prompt=ids, echo=True, logprobs=2, max_tokens=1).json()
    lp = body["choices"][0]["logprobs"]
    ended = body["choices"][0]["finish_reason"] == "stop"  # the EOS ended the text: it is listed, the text leaves it out
    assert len(lp["tokens"]) == len(ids) + body["usage"]["completion_tokens"] + ended == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert body["choices"][0]["text"].startswith(tok.decode(ids))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, :len(tok)]
    ref = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), ref, atol=2e-4, rtol=0)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == logprob and 2 <= len(top) <= 3  # the two most likely, and the token itself
    scored = complete(serve_app, prompt=ids, echo=True, logprobs=0, max_tokens=0).json()
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["text"] == tok.decode(ids)
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(ids)]
    plain = complete(serve_app, max_tokens=5).json()["choices"][0]
    assert plain["logprobs"] is None  # only when asked
    generated = complete(serve_app, max_tokens=5, logprobs=3).json()
    assert len(generated["choices"][0]["logprobs"]["tokens"]) == generated["usage"]["completion_tokens"] + (
        generated["choices"][0]["finish_reason"] == "stop")
    assert generated["choices"][0]["text"] == plain["text"]


def test_several_prompts_in_one_request_answer_one_choice_each_in_order(serve_app):
    """OpenAI's batch form of completions (strings or token-id lists): choice i answers prompt i as
    that prompt alone would, and usage adds up; lm-evaluation-harness sends its batches so."""
    from transformers import AutoTokenizer

    prompts = ["the market", "a long sport story", "shares rose"]
    alone = [complete(serve_app, prompt=p, max_tokens=6).json() for p in prompts]
    both = complete(serve_app, prompt=prompts, max_tokens=6).json()
    assert [c["index"] for c in both["choices"]] == [0, 1, 2]
    assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert both["usage"][key] == sum(a["usage"][key] for a in alone)
    tok = AutoTokenizer.from_pretrained(serve_app["config"]["models"][0]["path"])
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[:2]]
    scored = complete(serve_app, prompt=ids, echo=True, logprobs=1, max_tokens=1).json()
    for choice, p, prompt_ids in zip(scored["choices"], prompts, ids):
        single = complete(serve_app, prompt=prompt_ids, echo=True, logprobs=1, max_tokens=1).json()["choices"][0]
        assert choice["text"].startswith(p) and choice["logprobs"]["tokens"] == single["logprobs"]["tokens"]
        assert choice["logprobs"]["token_logprobs"][0] is None is single["logprobs"]["token_logprobs"][0]
        # the same up to float rounding (the generated token's is from the batch's padded forward)
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(single["logprobs"]["token_logprobs"][1:],
                                                                          abs=1e-4)


def test_n_choices_per_prompt(serve_app):
    """n choices per prompt, prompt by prompt (choice k answers prompt k // n); with a seed, choice
    j is what that prompt gives alone with seed + j; each prompt's tokens count once in usage."""
    prompts = ["the market", "shares rose"]
    body = complete(serve_app, prompt=prompts, n=3, max_tokens=6, temperature=1.0, seed=7).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for k, choice in enumerate(body["choices"]):
        alone = complete(serve_app, prompt=prompts[k // 3], max_tokens=6, temperature=1.0, seed=7 + k % 3).json()
        assert choice["text"] == alone["choices"][0]["text"]
    singles = [complete(serve_app, prompt=p, max_tokens=1).json()["usage"]["prompt_tokens"] for p in prompts]
    assert body["usage"]["prompt_tokens"] == sum(singles)
    chat = post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 6, "n": 2, "seed": 3,
                                                     "messages": [{"role": "user", "content": "hello"}]})
    assert chat.status_code == 200, chat.text
    assert [c["index"] for c in chat.json()["choices"]] == [0, 1]


def test_chat_completion(serve_app):
    r = post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 8, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    # a model without a chat template says so
    r = post(serve_app, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(r, 400)


def test_chat_content_parts_and_developer_role(serve_app):
    """OpenAI clients may send content as a list of text parts and the system role as "developer":
    the same conversation as plain strings and "system" gives the same greedy answer."""
    def chat(messages):
        r = post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 8, "temperature": 0,
                                                      "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]

    plain = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nthere"}])
    parts = chat([{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                  {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}])
    assert parts == plain
    r = post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert_openai_error(r, 400)
    assert "text only" in r.json()["error"]["message"]


def read_sse(r) -> list:
    events = []
    for line in r.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        events.append(line[len("data: "):])
    return events


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_sse(serve_app, chat):
    path, body = ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "the market"}]}) \
        if chat else ("/v1/completions", {"model": "tiny", "prompt": "the market"})
    body = {**body, "max_tokens": 12, "temperature": 0}
    plain = post(serve_app, path, body).json()
    with requests.post(serve_app["url"] + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if chat:
        assert chunks[0]["object"] == "chat.completion.chunk" and choices[0]["delta"]["role"] == "assistant"
        text = "".join(c["delta"].get("content", "") for c in choices)
        assert text == plain["choices"][0]["message"]["content"]
    else:
        text = "".join(c["text"] for c in choices)
        assert text == plain["choices"][0]["text"]
    assert choices[-1]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["finish_reason"] is None for c in choices[:-1])


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_logprobs_add_up_to_the_unstreamed_ones(serve_app, chat):
    """With stream: true, each chunk carries the log-probabilities of the tokens whose text it
    brings (completions: OpenAI's legacy lists, text offsets continuing across chunks; chat:
    content records); what a stop string held back, and the EOS that ended a completion, come in
    the chunk with the finish reason. Together they equal the non-streamed response's."""
    text = complete(serve_app, max_tokens=16).json()["choices"][0]["text"]
    # a stop string that could start at the text's end holds its last characters back until the
    # next token (here: to the end, as it never matches)
    stop = text[-1] + "\u2603"
    for extra in ({}, {"stop": stop}):
        if chat:
            path, body = "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "the market"}],
                                                   "logprobs": True, "top_logprobs": 2}
        else:
            path, body = "/v1/completions", {"model": "tiny", "prompt": "the market", "logprobs": 2}
        body = {**body, "max_tokens": 16, "temperature": 0, **extra}
        plain = post(serve_app, path, body).json()["choices"][0]
        with requests.post(serve_app["url"] + path, json={**body, "stream": True}, stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            choices = [json.loads(e)["choices"][0] for e in read_sse(r)[:-1]]
        with_text = [c for c in choices if (c["delta"].get("content") if chat else c["text"])]
        assert with_text, (choices, plain, extra)
        assert all(c["logprobs"] for c in with_text)
        if chat:
            streamed = [rec for c in choices if c["logprobs"] for rec in c["logprobs"]["content"]]
            assert streamed == plain["logprobs"]["content"]
            assert "".join(c["delta"].get("content", "") for c in choices) == plain["message"]["content"]
        else:
            merged = {k: [v for c in choices if c["logprobs"] for v in c["logprobs"][k]] for k in plain["logprobs"]}
            assert merged == plain["logprobs"]
            assert "".join(c["text"] for c in choices) == plain["text"]
    plain_body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    no_logprobs = post(serve_app, path, {**plain_body, "stream": True}, stream=True)
    assert all(json.loads(e)["choices"][0]["logprobs"] is None for e in read_sse(no_logprobs)[:-1]
               if json.loads(e)["choices"])


@pytest.mark.parametrize("chat", [False, True])
def test_several_choices_stream_interleaved_each_as_unstreamed(serve_app, chat):
    """stream: true with n > 1 (and in completions several prompts): the choices' chunks come
    interleaved as their tokens do, each naming its index; each choice's text, finish reason and
    log-probabilities equal the non-streamed response's choice, and usage adds up the same."""
    if chat:
        path, body = "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "the market"}],
                                               "logprobs": True, "top_logprobs": 1}
    else:
        path, body = "/v1/completions", {"model": "tiny", "prompt": ["the market", "shares rose"], "logprobs": 1}
    body = {**body, "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2}
    plain = post(serve_app, path, body).json()
    with requests.post(serve_app["url"] + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        chunks = [json.loads(e) for e in read_sse(r)[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert sorted({c["index"] for c in choices}) == list(range(len(plain["choices"]))) == list(range(4 if not chat else 2))
    for want in plain["choices"]:
        mine = [c for c in choices if c["index"] == want["index"]]
        assert [c["finish_reason"] for c in mine][-1] == want["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        if chat:
            assert "".join(c["delta"].get("content", "") for c in mine) == want["message"]["content"]
            assert [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]] == want["logprobs"]["content"]
        else:
            assert "".join(c["text"] for c in mine) == want["text"]
            assert [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]] == want["logprobs"]["tokens"]


def test_echo_streams_the_prompt_first_as_unstreamed(serve_app):
    """echo with stream: true: each choice's first chunk is its prompt (with logprobs, the
    prompt's tokens, the first one's null), then its generated text; the chunks add up to the
    non-streamed choice, also for a token-id prompt, several prompts, and max_tokens 0 (scoring)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_app["config"]["models"][0]["path"])
    ids = tok("shares rose in early trading", add_special_tokens=False)["input_ids"]
    for body in ({"prompt": "the market", "max_tokens": 6},
                 {"prompt": "the market", "max_tokens": 6, "logprobs": 1},
                 {"prompt": [ids, ids[:2]], "max_tokens": 5, "logprobs": 0},
                 {"prompt": ids, "max_tokens": 0, "logprobs": 2}):
        body = {"model": "tiny", "echo": True, "temperature": 0, **body}
        plain = post(serve_app, "/v1/completions", body)
        assert plain.status_code == 200, plain.text
        plain = plain.json()
        with requests.post(serve_app["url"] + "/v1/completions", json={**body, "stream": True}, stream=True,
                           timeout=60) as r:
            assert r.status_code == 200, r.text
            choices = [json.loads(e)["choices"][0] for e in read_sse(r)[:-1]]
        for want in plain["choices"]:
            mine = [c for c in choices if c["index"] == want["index"]]
            assert want["text"].startswith(mine[0]["text"]) and mine[0]["text"]  # the prompt, alone
            assert "".join(c["text"] for c in mine) == want["text"], body
            assert mine[-1]["finish_reason"] == want["finish_reason"]
            if "logprobs" in body:
                merged = {k: [v for c in mine if c["logprobs"] for v in c["logprobs"][k]] for k in want["logprobs"]}
                assert merged == want["logprobs"], body
                assert mine[0]["logprobs"]["token_logprobs"][0] is None
            else:
                assert all(c["logprobs"] is None for c in mine)


@pytest.mark.parametrize("chat", [False, True])
def test_repetition_penalties_reach_the_sampler(serve_app, chat):
    """presence/frequency (OpenAI) and repetition (vLLM) penalties change greedy output; the same
    request twice gives the same text."""
    if chat:
        path, body = "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "the market"}]}
        text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    else:
        path, body = "/v1/completions", {"model": "tiny", "prompt": "the market"}
        text = lambda r: r["choices"][0]["text"]  # noqa: E731
    body = {**body, "max_tokens": 24, "temperature": 0}
    plain = text(post(serve_app, path, body).json())
    for extra in ({"frequency_penalty": 2, "presence_penalty": 2}, {"repetition_penalty": 3.0}):
        r = post(serve_app, path, {**body, **extra})
        assert r.status_code == 200, r.text
        assert text(r.json()) != plain and text(post(serve_app, path, {**body, **extra}).json()) == text(r.json())


def test_logit_bias_bans_and_forces_tokens(serve_app):
    """-100 keeps a token out of greedy output, +100 makes it the only one; {} changes nothing."""
    body = {"model": "tiny", "prompt": "the market", "max_tokens": 8, "temperature": 0, "logprobs": 0}
    plain = post(serve_app, "/v1/completions", body).json()["choices"][0]
    assert post(serve_app, "/v1/completions", {**body, "logit_bias": {}}).json()["choices"][0] == plain
    first = plain["logprobs"]["tokens"][0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(serve_app["config"]["models"][0]["path"])
    first_id = tok.convert_tokens_to_ids(tok.tokenize(first))[0]
    banned = post(serve_app, "/v1/completions", {**body, "logit_bias": {str(first_id): -100}}).json()["choices"][0]
    assert first not in banned["logprobs"]["tokens"]
    forced_id = tok.convert_tokens_to_ids(tok.tokenize(" shares"))[0]
    forced = post(serve_app, "/v1/completions", {**body, "logit_bias": {str(forced_id): 100}}).json()["choices"][0]
    assert forced["text"] == tok.decode([forced_id] * 8)


def test_min_tokens_and_ignore_eos_as_vllm(serve_app):
    """vLLM's min_tokens and ignore_eos (benchmark clients send them): with EOS made the likeliest
    token, the text ends after min_tokens, or runs to max_tokens with ignore_eos."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(serve_app["config"]["models"][0]["path"]).eos_token_id
    body = {"model": "tiny", "prompt": "the market", "max_tokens": 7, "temperature": 0, "logit_bias": {str(eos): 100}}
    held = post(serve_app, "/v1/completions", {**body, "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] == 3 and held["choices"][0]["finish_reason"] == "stop"
    through = post(serve_app, "/v1/completions", {**body, "ignore_eos": True}).json()
    assert through["usage"]["completion_tokens"] == 7 and through["choices"][0]["finish_reason"] == "length"
    chat = post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 5, "min_tokens": 5, "temperature": 0}).json()
    assert chat["usage"]["completion_tokens"] == 5


def test_stop_strings(serve_app):
    text = complete(serve_app, max_tokens=20).json()["choices"][0]["text"]
    assert len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    r = complete(serve_app, max_tokens=20, stop=[stop]).json()
    assert r["choices"][0]["text"] == text[:cut] and r["choices"][0]["finish_reason"] == "stop"
    with requests.post(serve_app["url"] + "/v1/completions", stream=True, timeout=60, json={
            "model": "tiny", "prompt": "the market", "max_tokens": 20, "temperature": 0, "stop": stop, "stream": True}) as s:
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in read_sse(s)[:-1])
    assert streamed == text[:cut]  # a stop string never leaks into the stream


def test_seed_reproducible(serve_app):
    a = complete(serve_app, temperature=1.0, top_p=0.95, top_k=50, seed=7, max_tokens=16).json()["choices"][0]["text"]
    b = complete(serve_app, temperature=1.0, top_p=0.95, top_k=50, seed=7, max_tokens=16).json()["choices"][0]["text"]
    others = {complete(serve_app, temperature=1.0, seed=s, max_tokens=16).json()["choices"][0]["text"] for s in range(4)}
    assert a == b and len(others) > 1


def test_kv_cache_matches_no_cache_over_http(serve_app):
    for prompt in ("the market", "sport results today"):
        with_cache = complete(serve_app, prompt=prompt, max_tokens=20).json()["choices"][0]["text"]
        without = complete(serve_app, model="tiny-nocache", prompt=prompt, max_tokens=20).json()["choices"][0]["text"]
        assert with_cache == without


@pytest.mark.parametrize("model", ["tiny", "tiny-int8"])  # int8: calibrated activation scales
def test_concurrent_requests_are_batched_and_equal_sequential(serve_app, model):
    prompts = [f"the market {i}" for i in range(6)]
    sequential = [complete(serve_app, model=model, prompt=p).json()["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda p: complete(serve_app, model=model, prompt=p), prompts))
    assert [r.json()["choices"][0]["text"] for r in rs] == sequential
    assert max(int(r.headers["X-Batch-Size"]) for r in rs) > 1


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": 42}, None),
    ({"model": "tiny", "prompt": "x", "stop": [1]}, None),
    ({"model": "tiny", "prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"model": "tiny", "prompt": "x", "n": 17}, "n"),
    ({"model": "tiny", "prompt": ["x"] * 20, "n": 2}, "prompt"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"model": "tiny", "prompt": [1, -2]}, "prompt"),
    ({"model": "tiny", "prompt": [10_000_000]}, "prompt"),
    ({"model": "tiny", "prompt": [[1, 2], []]}, "prompt"),
    ({"model": "tiny", "prompt": ["x"] * 33}, "prompt"),
    ({"model": "tiny", "prompt": [1, "x"]}, None),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "echo"),
    ({"model": "tiny", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias.5"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {str(t): 1 for t in range(1025)}}, "logit_bias"),
])
def test_bad_parameters_are_400(serve_app, body, param):
    assert_openai_error(post(serve_app, "/v1/completions", body), 400, param)


def test_malformed_json_unknown_model_and_routes(serve_app):
    assert_openai_error(post(serve_app, "/v1/completions", "{not json"), 400)
    assert_openai_error(post(serve_app, "/v1/completions", "[1, 2]"), 400)
    assert_openai_error(post(serve_app, "/v1/completions", b"\xff\xfe"), 400)
    assert_openai_error(post(serve_app, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    assert_openai_error(post(serve_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_openai_error(post(serve_app, "/v1/classify", {"model": "tiny", "input": "x"}), 400, "model")
    assert_openai_error(requests.get(serve_app["url"] + "/v1/nothing", timeout=10), 404)
    assert_openai_error(post(serve_app, "/v1/completions", {"model": "tiny", "prompt": "x" * 2_000_000}), 413)


def test_overload_answers_503_quickly(serve_app):
    def one(_):
        r = post(serve_app, "/v1/completions", {"model": "tiny-busy", "prompt": "the market", "max_tokens": 40,
                                                 "temperature": 0})
        return r.status_code, r
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for c, r in results:
        if c == 503:
            assert_openai_error(r, 503)


def test_autoscaling_adds_a_replica_under_load(serve_app):
    """min 1, max 2 replicas, target 1 ongoing request: sustained concurrent load adds the second
    replica, and every request is still answered."""
    import threading
    import time

    from ray import serve

    def running() -> int:
        dep = serve.status().applications["llm"].deployments["model-tiny-scaling"]
        return dep.replica_states.get("RUNNING", 0)

    assert running() == 1
    stop, codes = threading.Event(), []

    def load():
        while not stop.is_set():
            codes.append(post(serve_app, "/v1/completions", {"model": "tiny-scaling", "prompt": "the market",
                                                              "max_tokens": 40, "temperature": 0}).status_code)
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 90
        while running() < 2 and time.time() < deadline:
            time.sleep(0.5)
        scaled = running()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert scaled == 2, serve.status().applications["llm"].deployments["model-tiny-scaling"]
    assert codes and set(codes) == {200}, codes


def test_classify_and_predict(serve_app):
    r = post(serve_app, "/v1/classify", {"model": "topics", "input": ["stocks fell sharply", "the match ended"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and all(d["label"] in ("business", "sport", "tech") for d in data)
    assert all(abs(sum(d["probabilities"].values()) - 1) < 1e-4 for d in data)
    assert r.json()["id"].startswith("clf-")
    # "text", /predict's field, names the input too; both at once is a 400
    r = post(serve_app, "/v1/classify", {"model": "topics", "text": "stocks fell sharply"})
    assert r.status_code == 200 and r.json()["data"][0]["label"] == data[0]["label"], r.text
    r = post(serve_app, "/v1/classify", {"model": "topics", "text": "a", "input": "b"})
    assert_openai_error(r, 400)
    assert "set input or text (the same field), not both" in r.json()["error"]["message"]
    r = post(serve_app, "/predict", {"text": "the market"})
    assert r.status_code == 200 and isinstance(r.json()["response"], str) and r.json()["id"]


def test_compressed_variants_answer(serve_app):
    for name in ("tiny-int8", "tiny-pruned"):
        body = complete(serve_app, model=name).json()
        assert body["model"] == name and body["usage"]["completion_tokens"] > 0


def test_metrics_reach_rays_prometheus_endpoint(serve_app):
    import time

    import ray

    complete(serve_app)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "llm_requests_total" in text and "llm_time_to_first_token_seconds" in text and "llm_batch_size" in text:
            break
        time.sleep(2)
    for name in ("llm_requests_total", "llm_request_latency_seconds", "llm_time_to_first_token_seconds",
                 "llm_time_per_output_token_seconds", "llm_tokens_generated_total", "llm_batch_size"):
        assert name in text, name
    assert 'route="/v1/completions"' in text and 'status="200"' in text


def test_official_openai_client(serve_app):
    """The official ``openai`` Python client against the app: it parses every shape we return."""
    import openai

    c = openai.OpenAI(base_url=serve_app["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in c.models.list()} >= {"tiny", "tiny-chat"}
    assert c.models.retrieve("tiny-chat").id == "tiny-chat"
    r = c.completions.create(model="tiny", prompt="the market", max_tokens=6, temperature=0, seed=1)
    assert r.id.startswith("cmpl-") and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="tiny", prompt="the market", max_tokens=6, temperature=0, seed=1, stream=True)
                       if ch.choices)
    assert streamed == r.choices[0].text
    chat = c.chat.completions.create(model="tiny-chat", max_completion_tokens=6, temperature=0, messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    chunks = list(c.chat.completions.create(model="tiny-chat", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hello"}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    scored = c.chat.completions.create(model="tiny-chat", max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                       messages=[{"role": "user", "content": "hello"}])
    content = scored.choices[0].logprobs.content
    assert scored.choices[0].message.content == chat.choices[0].message.content
    assert len(content) == scored.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob == t.logprob and t.logprob <= 0 for t in content)  # greedy: the best
    streamed = [t for ch in c.chat.completions.create(model="tiny-chat", max_tokens=6, temperature=0, logprobs=True,
                                                      top_logprobs=2, stream=True,
                                                      messages=[{"role": "user", "content": "hello"}])
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    r = c.completions.create(model="tiny", prompt="the market", max_tokens=6, temperature=0, logprobs=1, echo=True)
    assert r.choices[0].logprobs.token_logprobs[0] is None and r.choices[0].text.startswith("the market")
    echoed = [ch.choices[0] for ch in c.completions.create(model="tiny", prompt="the market", max_tokens=6, temperature=0,
                                                           logprobs=1, echo=True, stream=True) if ch.choices]
    assert "".join(ch.text for ch in echoed) == r.choices[0].text
    assert [t for ch in echoed if ch.logprobs for t in ch.logprobs.tokens] == r.choices[0].logprobs.tokens
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert exc.value.body["code"] == "context_length_exceeded"


# Last in the module: it restarts the application with one model (see the autouse fixture above).
def test_api_key_and_feedback_survives_restart(serve_app):
    rid = complete(serve_app).json()["id"]
    ok = post(serve_app, "/v1/feedback", {"id": rid, "rating": 4, "comment": "useful"})
    assert ok.status_code == 200 and ok.json()["status"] == "stored", ok.text
    assert_openai_error(post(serve_app, "/v1/feedback", {"id": "cmpl-unknown", "rating": 4}), 404, "id")
    assert_openai_error(post(serve_app, "/v1/feedback", {"id": rid, "rating": 99}), 400, "rating")
    assert_openai_error(post(serve_app, "/v1/feedback", {"id": rid, "rating": "good"}), 400, "rating")
    # restart the application (one model, to keep the test short) with an API key: the feedback
    # is still there, and the key is enforced
    cfg = serve_app["config"]
    serve_app["reduced"] = True  # the next test of this module, if any, redeploys the whole app first
    deploy({**cfg, "api_key": "s3cret", "models": [m for m in cfg["models"] if m["name"] == "tiny"]}, serve_app["url"])
    assert_openai_error(complete_raw(serve_app), 401)
    assert_openai_error(complete_raw(serve_app, headers={"Authorization": "Bearer wrong"}), 401)
    assert complete_raw(serve_app, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    stored = requests.get(f"{serve_app['url']}/v1/responses/{rid}", headers={"Authorization": "Bearer s3cret"},
                          timeout=10).json()
    assert stored["feedback"][0]["rating"] == 4 and stored["feedback"][0]["comment"] == "useful"


def complete_raw(app, **kw):
    return post(app, "/v1/completions", {"model": "tiny", "prompt": "the market", "max_tokens": 4}, **kw)
