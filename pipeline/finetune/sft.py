"""Chat / instruction data for supervised fine-tuning.

Examples come as ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "completion"}``
JSONL, or from the built-in ``chatterbot`` dialogs (turns alternate user / assistant). They are
rendered with ``CHAT_TEMPLATE`` (opened by BOS where the base's tokenizer opens texts with one;
saved with the tokenizer, so ``apply_chat_template`` gives the same text) and tokenized segment by
segment, so that the loss mask is exact: only assistant content and its end-of-turn token carry
labels; everything else is -100.

A base whose tokenizer has a chat template of its own (a chat model from elsewhere) keeps it:
conversations are rendered with it, and the characters each assistant turn adds (between the
rendering of the turns before it with the generation prompt and the rendering that includes it)
carry the labels, mapped to tokens through the tokenizer's offsets.
"""

from __future__ import annotations

from typing import Iterator

from pipeline.model.build import token_id_list

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
# each turn ends with the tokenizer's own EOS (<|endoftext|> for ours and GPT-2's, </s> for Llama's)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# the same, opened by the BOS token, for a base whose tokenizer starts every text with one (Llama's):
# its model saw BOS at the first position throughout pretraining
CHAT_TEMPLATE_BOS = "{{ bos_token }}" + CHAT_TEMPLATE
OUR_TEMPLATES = (CHAT_TEMPLATE, CHAT_TEMPLATE_BOS)


def adds_bos(tok) -> bool:
    """Whether ``tok`` opens an encoded text with its BOS token."""
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def prepare_chat_tokenizer(tok, template: str = "auto") -> list[str]:
    """Give ``tok`` our chat template and the role tokens it lacks (a tokenizer from elsewhere, e.g.
    GPT-2's, has none: its unknown-token lookup would turn every role header into the same id,
    and the rendered template would be split into ordinary pieces), unless ``template`` is
    "auto" and ``tok`` has a chat template of its own, which is then kept. Returns the tokens
    added; the model's embeddings must then cover their ids."""
    if tok.eos_token_id is None:
        raise ValueError("base_model: its tokenizer has no EOS token, which SFT needs to end each turn")
    if template == "auto" and getattr(tok, "chat_template", None):
        if not getattr(tok, "is_fast", False):
            raise ValueError("base_model: its chat template is kept (data.chat_template: auto), which needs a fast "
                             "tokenizer (offsets) for the loss mask; set data.chat_template: builtin")
        return []
    vocab = tok.get_vocab()
    missing = [t for t in ROLE_TOKENS if t not in vocab]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE_BOS if adds_bos(tok) else CHAT_TEMPLATE
    return missing


def turn_end_id(tok) -> int | None:
    """The token that ends an assistant turn in ``tok``'s chat template: the EOS with ours; with a
    base's own template, the first special token its rendering puts after the assistant's content
    (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``). None when
    the template puts none there."""
    if tok.chat_template in OUR_TEMPLATES:
        return tok.eos_token_id
    answer = "Hello there"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # a template that needs more than a user and an assistant turn
        return None
    after = text[text.rfind(answer) + len(answer):] if answer in text else ""
    special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                                          if getattr(t, "special", False)}
    return next((i for i in tok(after, add_special_tokens=False)["input_ids"] if i in special), None)


def stop_at_turn_end(model, tok) -> list[str]:
    """Make the model's own config name the token that ends an assistant turn (``turn_end_id``:
    the EOS with our template, e.g. ``<|im_end|>`` with a base's ChatML), so that ``generate()``
    from the exported directory, and Serve, stop where a turn ends. A base from elsewhere may name
    another EOS (a base model's ``<|endoftext|>`` beside its chat template's ``<|im_end|>``), none,
    or an id past its vocabulary (a GPT-2 config's default 50256 beside a smaller tokenizer). The
    EOS ids it names that are real tokens are kept beside the turn's end. Returns what changed."""
    eos = turn_end_id(tok)
    if eos is None:
        return []
    n = model.get_input_embeddings().num_embeddings
    changed = []
    for where, cfg in (("config", model.config), ("generation_config", model.generation_config)):
        if cfg is None:
            continue
        cur = getattr(cfg, "eos_token_id", None)
        ids = token_id_list(cur)
        valid = [i for i in ids if isinstance(i, int) and 0 <= i < n]
        if eos in valid and len(valid) == len(ids):
            continue
        if eos not in valid:
            valid.append(eos)
        cfg.eos_token_id = valid[0] if len(valid) == 1 else valid
        changed.append(f"{where}.eos_token_id {cur!r} -> {cfg.eos_token_id!r}")
        if getattr(cfg, "pad_token_id", None) is None or not 0 <= cfg.pad_token_id < n:
            cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        bos = getattr(cfg, "bos_token_id", None)
        if isinstance(bos, int) and not 0 <= bos < n:  # an id past the vocabulary names no token
            cfg.bos_token_id = tok.bos_token_id
    return changed


def _content(content, where: str):
    """A message's text: a string, or OpenAI's list of content parts (text parts only), joined with
    newlines as the Serve endpoint joins them; None when it is neither."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return None
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content part {j} is not a text part ({{'type': 'text', 'text': str}}), got "
                             f"{part!r}"[:300])
    return "\n".join(part["text"] for part in content)


def validate_messages(messages, where: str) -> list[dict]:
    """``{"role", "content"}`` dicts: OpenAI's "developer" role is "system" (as at the Serve endpoint), and
    an assistant message with OpenAI's ``"weight": 0`` stays in the context but carries no labels
    (``"learn": False``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        m = m if isinstance(m, dict) else {"not a message": m}
        role = "system" if m.get("role") == "developer" else m.get("role")
        content = _content(m.get("content"), f"{where}: messages[{i}]")
        if role not in ROLES or content is None:
            raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str or a list of "
                             f"text parts}}, got {messages[i]!r}"[:300])
        msg = {"role": role, "content": content}
        if "weight" in m:
            w = m["weight"]
            if role != "assistant" or isinstance(w, bool) or w not in (0, 1):
                raise ValueError(f"{where}: messages[{i}]: 'weight' must be 0 or 1, on an assistant message, got "
                                 f"{w!r} on a {role} message")
            if w == 0:
                msg["learn"] = False
        if learns(msg) and not content.strip():
            raise ValueError(f"{where}: messages[{i}]: an empty assistant answer would teach the model to answer "
                             f"nothing (to keep it as context only, give it 'weight': 0)")
        out.append(msg)
    if not any(learns(m) for m in out):
        raise ValueError(f"{where}: no assistant message to learn from")
    return out


def learns(message: dict) -> bool:
    """Whether a message's tokens carry labels: an assistant message not weighted 0."""
    return message["role"] == "assistant" and message.get("learn", True)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# the fields a chat record is read from (record_to_messages): a .json file holding one object
# holding none of them is a wrapper of records ({"data": [...]}: sources.object_records)
CHAT_FIELDS = ("messages", "conversations", "prompt", "instruction")


def record_to_messages(obj: dict, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON {type(obj).__name__}, not an object")
    if "messages" in obj:
        return validate_messages(obj["messages"], where)
    if isinstance(obj.get("conversations"), list):  # ShareGPT: [{"from": "human" | "gpt" | "system", "value"}]
        turns = obj["conversations"]
        return validate_messages([{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                                  if isinstance(t, dict) else t for t in turns], where)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return validate_messages([{"role": "user", "content": obj["prompt"]},
                                  {"role": "assistant", "content": obj["completion"]}], where)
    if isinstance(obj.get("prompt"), list) and isinstance(obj.get("completion"), list):  # conversational prompt-completion
        return validate_messages(obj["prompt"] + obj["completion"], where)
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):  # Alpaca
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        user = obj["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")
        system = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) and obj["system"] else []
        return validate_messages(system + [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}],
                                 where)
    for a, b, kinds in (("prompt", "completion", "strings, or lists of messages"),
                        ("instruction", "output", "strings (Alpaca)")):
        if a in obj or b in obj:  # a record of a known shape with a field missing or of another type
            raise ValueError(f"{where}: {a!r} and {b!r} must both be {kinds}; got {a} {_json_kind(obj, a)} and "
                             f"{b} {_json_kind(obj, b)}")
    raise ValueError(f"{where}: expected 'messages', 'conversations' (ShareGPT), 'prompt' + 'completion' or "
                     f"'instruction' (+ 'input') + 'output' (Alpaca); got the keys {sorted(obj)[:10]}")


def _json_kind(obj: dict, key: str) -> str:
    if key not in obj:
        return "missing"
    value = obj[key]
    return "null" if value is None else {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(
        type(value), "a number")


def load_chat_examples(path: str, bad: list[dict]) -> Iterator[list[dict]]:
    """Conversations from a JSONL, JSON (an array) or Parquet file, a directory or glob of them, a saved Hugging
    Face dataset, or the built-in ``chatterbot``; each record ``messages``, ShareGPT ``conversations`` or ``prompt`` +
    ``completion``, or Alpaca ``instruction`` (+ ``input``) + ``output``. Bad records go to ``bad`` with their reason."""
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
    from pipeline.data.sources import _open, data_files, detect_format, hf_rows, json_records, path_kind

    files = data_files(path, ("jsonl", "json", "parquet"), "a chat data file (.jsonl, .json or .parquet)", bad)
    if files is not None:  # a directory or glob of such files (shards), file by file
        for file in files:
            yield from load_chat_examples(file, bad)
        return
    kind = path_kind(path)  # a local path or a URI; compressed files too
    if kind == "hf":  # a DatasetDict: its train split(s), never a held-out one
        records = ((f"{path}:{where}", row) for where, row in hf_rows(path, only_train=True))
    elif kind == "file" and detect_format(path) == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            table = pq.read_table(f)
        records = ((f"{path}:{i}", row) for i, row in enumerate(table.to_pylist()))
    elif kind == "file":
        records = json_records(path, bad, CHAT_FIELDS)
    else:
        raise ValueError(f"{path}: not found (data.train / data.val: a JSONL, JSON or Parquet file, a saved Hugging Face "
                         f"dataset directory, or chatterbot)")
    for where, obj in records:
        try:
            yield record_to_messages(obj, where)
        except ValueError as exc:
            bad.append({"where": where, "reason": str(exc)[:300]})


def tokenize_chat(messages: list[dict], tok, max_len: int) -> dict:
    """input_ids, attention_mask, labels (-100 except assistant content + its end-of-turn)."""
    if tok.chat_template not in OUR_TEMPLATES:
        return _tokenize_rendered(messages, tok, max_len)
    eos = tok.eos_token_id
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = [tok.bos_token_id] if tok.chat_template == CHAT_TEMPLATE_BOS else []
    labels: list[int] = [-100] * len(ids)
    for m in messages:
        header = tok.convert_tokens_to_ids(f"<|{m['role']}|>")
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        ids += [header] + newline
        labels += [-100] * (1 + len(newline))
        ids += content + [eos]
        labels += (content + [eos]) if learns(m) else [-100] * (len(content) + 1)
        ids += newline
        labels += [-100] * len(newline)
    if getattr(tok, "is_fast", False) and \
            tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"] != ids:
        # a tokenizer that encodes a piece differently in context (SentencePiece-style Metaspace: "\nHow"
        # is not "\n" + "How"): train on what Serve encodes, the rendered text; the newline that follows
        # each turn's EOS carries no label, as above
        return _tokenize_rendered(messages, tok, max_len, tail=1)
    return _padded(ids, labels, tok, max_len)


def _tokenize_rendered(messages: list[dict], tok, max_len: int, tail: int = 0) -> dict:
    """The rendered conversation encoded whole (the base's own template, or ours for a tokenizer
    that needs it): each assistant turn's added characters, but the last ``tail``, carry the labels."""
    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if not learns(m):
            continue
        before, upto = _generation_prompt_alone(render) if i == 0 else render(messages[:i], True), \
            render(messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(before) and len(before) < len(upto)):
            raise ValueError("the base's chat template does not render this conversation turn by turn (an earlier "
                             "rendering is not a prefix of a later one), so its assistant tokens cannot be told "
                             "apart; set data.chat_template: builtin")
        spans.append((len(before), len(upto) - tail))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= start < b for a, b in spans) else -100
              for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return _padded(list(enc["input_ids"]), labels, tok, max_len)


def _generation_prompt_alone(render) -> str:
    """What a template renders before a conversation's first turn when it is the assistant's."""
    try:
        return render([], True)
    except Exception:  # templates that index messages[0]
        return ""


def _padded(ids: list[int], labels: list[int], tok, max_len: int) -> dict:
    n_full = len(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == -100 for t in labels[1:]):  # nothing to learn (a batch of such rows would be a NaN loss)
        raise ValueError(f"no assistant token within data.max_seq_len ({max_len} of the conversation's {n_full} "
                         f"tokens): the turns before the first answer fill the window")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    n = len(ids)
    return {"input_ids": ids + [pad] * (max_len - n), "attention_mask": [1] * n + [0] * (max_len - n),
            "labels": labels + [-100] * (max_len - n)}
