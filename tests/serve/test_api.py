"""Request schemas of the OpenAI-compatible routes (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.serve.api import ChatRequest, validation_error


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
