"""Request schemas of the OpenAI-compatible routes (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.serve.api import ChatRequest, CompletionRequest, validation_error


def test_content_parts_are_joined_and_developer_is_system():
    req = ChatRequest(messages=[{"role": "developer", "content": "rules"},
                                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert [m.model_dump(exclude_none=True) for m in req.messages] == [
        {"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("content, where", [
    ([{"type": "image_url", "image_url": {"url": "http://x"}}], "messages.0.content.0.type"),
    ([], "messages.0.content"),
    ([{"type": "text"}], "messages.0.content.0.text"),
    ([{"type": "text", "text": 3}], "messages.0.content.0.text"),
    (None, "messages.0.content"),
])
def test_bad_content_names_the_field(content, where):
    with pytest.raises(ValidationError) as exc:
        ChatRequest(messages=[{"role": "user", "content": content}])
    err = validation_error(exc.value)
    assert err.status == 400 and err.param == where, (err.param, err.message)


def test_unknown_role_is_rejected():
    with pytest.raises(ValidationError) as exc:
        ChatRequest(messages=[{"role": "tool", "content": "x"}])
    assert validation_error(exc.value).param == "messages.0.role"


def test_null_optional_parameters_mean_their_defaults():
    # clients that send every parameter they know send the unset ones as null, as OpenAI accepts
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=None, top_p=None, n=None,
                      stop=None, max_tokens=None, stream=None, stream_options=None, seed=None, logprobs=None,
                      presence_penalty=None, frequency_penalty=None, user=None, model=None)
    assert (req.temperature, req.top_p, req.n, req.stop, req.stream) == (1.0, 1.0, 1, None, False)
    assert CompletionRequest(prompt="x", echo=None, best_of=None, suffix=None).echo is False
    for required in ({"prompt": None}, {}):  # a required field is still required
        with pytest.raises(ValidationError) as exc:
            CompletionRequest(**required)
        assert validation_error(exc.value).param == "prompt"
    with pytest.raises(ValidationError):
        ChatRequest(messages=None)


def test_top_k_minus_one_means_no_cut_as_in_vllm():
    assert CompletionRequest(prompt="x", top_k=-1).top_k == 0 == CompletionRequest(prompt="x").top_k
    with pytest.raises(ValidationError) as exc:
        CompletionRequest(prompt="x", top_k=-2)
    assert validation_error(exc.value).param == "top_k"


def test_a_suffix_is_refused_not_ignored():
    """suffix asks for an insertion this server cannot do: it was accepted and dropped."""
    assert CompletionRequest(prompt="x", suffix="").suffix == ""
    with pytest.raises(ValidationError) as exc:
        CompletionRequest(prompt="x", suffix="end of the text")
    assert validation_error(exc.value).param == "suffix"


def test_a_seed_is_a_64_bit_integer():
    """A seed past 2**64 - 1 passed validation and failed inside the model's batch, failing the
    other requests batched with it; a 64-bit one (and seed + j for n choices) seeds the generator."""
    import torch

    for seed in (-2**63, 2**63 - 1):
        assert CompletionRequest(prompt="x", seed=seed).seed == seed
        torch.Generator().manual_seed(seed + 15)  # the 16th choice's seed
    for seed in (2**64, -2**63 - 1, 2**63):
        with pytest.raises(ValidationError) as exc:
            ChatRequest(messages=[{"role": "user", "content": "hi"}], seed=seed)
        assert validation_error(exc.value).param == "seed"


def test_a_non_number_is_named_as_such():
    with pytest.raises(ValidationError) as exc:
        CompletionRequest(prompt="x", temperature="hot")
    err = validation_error(exc.value)
    assert err.param == "temperature" and "valid number" in err.message, err.message


def test_chat_parameters_clients_send_at_neutral_values_are_accepted_and_others_named():
    msgs = [{"role": "user", "content": "hi"}]
    ChatRequest(messages=msgs, response_format={"type": "text"}, tools=[], tool_choice="none", parallel_tool_calls=True,
                top_logprobs=0, store=False, metadata={"run": "a"})
    for field, value in (("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
                         ("tool_choice", "required"), ("store", True), ("top_logprobs", 3), ("functions", [])):
        with pytest.raises(ValidationError) as exc:
            ChatRequest(messages=msgs, **{field: value})
        err = validation_error(exc.value)
        assert err.status == 400 and err.param == field, (field, err.param, err.message)


@pytest.mark.parametrize("body, where, words", [
    ({"text": 5}, "input", "valid string"),
    ({"text": ""}, "input", "non-empty"),
    ({"text": "a", "input": "b"}, None, "not both"),
    ({"texts": "a"}, "input", "Field required"),
])
def test_classify_takes_text_or_input_and_names_a_bad_one(body, where, words):
    from pipeline.serve.api import ClassifyRequest

    assert ClassifyRequest.model_validate({"text": "a"}).input == ClassifyRequest.model_validate({"input": "a"}).input
    with pytest.raises(ValidationError) as exc:
        ClassifyRequest.model_validate(body)
    err = validation_error(exc.value)
    assert err.status == 400 and err.param == where and words in err.message, (err.param, err.message)
