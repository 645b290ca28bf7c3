"""Chat / instruction data for supervised fine-tuning.

Examples come as ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "completion"}``
JSONL, or from the built-in ``chatterbot`` dialogs (turns alternate user / assistant). They are
rendered with ``CHAT_TEMPLATE`` (saved with the tokenizer, so ``apply_chat_template`` gives the
same text) and tokenized segment by segment, so that the loss mask is exact: only assistant
content and its end-of-turn token carry labels; everything else is -100.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
# each turn ends with the tokenizer's own EOS (<|endoftext|> for ours and GPT-2's, </s> for Llama's)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def prepare_chat_tokenizer(tok) -> list[str]:
    """Set the chat template on ``tok`` and give it the role tokens it lacks (a tokenizer from
    elsewhere, e.g. GPT-2's, has none: its unknown-token lookup would turn every role header
    into the same id, and the rendered template would be split into ordinary pieces). Returns the
    tokens added; the model's embeddings must then cover their ids."""
    if tok.eos_token_id is None:
        raise ValueError("base_model: its tokenizer has no EOS token, which SFT needs to end each turn")
    vocab = tok.get_vocab()
    missing = [t for t in ROLE_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return missing


def validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant message to learn from")
    return out


def record_to_messages(obj: dict, where: str) -> list[dict]:
    if "messages" in obj:
        return validate_messages(obj["messages"], where)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise ValueError(f"{where}: expected 'messages' or 'prompt' + 'completion'")


def load_chat_examples(path: str, bad: list[dict]) -> Iterator[list[dict]]:
    """Conversations from a JSONL file or the built-in ``chatterbot``; bad records go to ``bad``."""
    if path == "chatterbot":
        from pipeline.data.sources import SourceConfig, expand_source, read_file

        for task in expand_source(SourceConfig(path="chatterbot")):
            for rec in read_file(task, 1_000_000):
                if rec.get("text") is None:
                    bad.append({"where": rec["doc_id"], "reason": rec.get("reason")})
                    continue
                turns = [t for t in rec["text"].split("\n") if t.strip()]
                if len(turns) < 2:
                    bad.append({"where": rec["doc_id"], "reason": "dialog has fewer than two turns"})
                    continue
                yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.path not found: {path}")
    for lineno, line in enumerate(p.open(encoding="utf-8", errors="replace"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield record_to_messages(json.loads(line), where)
        except (json.JSONDecodeError, ValueError) as exc:
            bad.append({"where": where, "reason": str(exc)[:300]})


def tokenize_chat(messages: list[dict], tok, max_len: int) -> dict:
    """input_ids, attention_mask, labels (-100 except assistant content + its end-of-turn)."""
    eos = tok.eos_token_id
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        header = tok.convert_tokens_to_ids(f"<|{m['role']}|>")
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        ids += [header] + newline
        labels += [-100] * (1 + len(newline))
        ids += content + [eos]
        labels += (content + [eos]) if m["role"] == "assistant" else [-100] * (len(content) + 1)
        ids += newline
        labels += [-100] * len(newline)
    ids, labels = ids[:max_len], labels[:max_len]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    n = len(ids)
    return {"input_ids": ids + [pad] * (max_len - n), "attention_mask": [1] * n + [0] * (max_len - n),
            "labels": labels + [-100] * (max_len - n)}
