"""Batched text generation with a KV cache: the pure-torch core of the serving stage.

``Engine.generate`` runs one batch of requests to completion: the prompts are left-padded into
one tensor, the first forward pass fills the KV cache, then each step feeds one token per row
and reuses the cache (``use_cache=False`` recomputes the whole prefix every step, the baseline
the cache is measured against and must agree with token for token under greedy decoding). Each
request keeps its own sampling parameters and its own seeded ``torch.Generator``, so a seeded
request gives the same text whether it runs alone or in a batch of identical composition.

Nothing here knows about Ray, HTTP or asyncio (see ``batcher.py`` and ``app.py``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.model.build import context_length


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    """The state and result of one request within a batch."""

    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded completion, cut at a stop string
    emitted: int = 0  # characters of ``text`` already handed to the caller
    prefix_offset: int = 0  # incremental detokenization: text is complete up to read_offset
    read_offset: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    first_token_s: float | None = None  # seconds from the batch start to this row's first token


# on_event(row, text_delta, finished): called after every step for rows that produced text
EventFn = Callable[[int, str, bool], None]


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 8) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length(model.config)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt < 1:
            raise ValueError("the prompt is empty")
        if n_prompt + max_tokens > self.context_length:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                             f"length ({self.context_length})")

    @torch.inference_mode()
    def generate(self, requests: list[tuple[list[int], SamplingParams]], *, use_cache: bool = True,
                 on_event: EventFn | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Generation]:
        """Run a batch to completion. ``cancelled(row)`` is polled every step: a row whose client
        has gone stops generating (finish reason "cancelled"), and the batch ends early when no
        row is left."""
        if not requests:
            return []
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        gens = [Generation(prompt_ids=list(ids), params=p) for ids, p in requests]
        for g in gens:
            self.check_fits(len(g.prompt_ids), g.params.max_tokens)
        device = next(self.model.parameters()).device
        rngs = [torch.Generator().manual_seed(g.params.seed if g.params.seed is not None
                                              else int(torch.randint(0, 2**62, ()).item())) for g in gens]
        width = max(len(g.prompt_ids) for g in gens)
        ids = torch.full((len(gens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for i, g in enumerate(gens):  # left padding: every row's next token lands in the last column
            ids[i, width - len(g.prompt_ids):] = torch.tensor(g.prompt_ids)
            mask[i, width - len(g.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        start = time.perf_counter()
        cache = None
        step_ids = ids
        steps = max(g.params.max_tokens for g in gens)
        for step in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            if use_cache:
                out = self.model(input_ids=step_ids, attention_mask=mask, cache=cache, use_cache=True,
                                 position_ids=positions[:, -step_ids.shape[1]:])
                cache = out.cache
            else:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            logits = out.logits[:, -1, :].float()
            next_ids = torch.full((len(gens),), self.pad_id, dtype=torch.long)
            for i, g in enumerate(gens):
                if g.finish_reason is not None:
                    continue
                if cancelled is not None and cancelled(i):
                    g.finish_reason = "cancelled"
                    continue
                tok = sample(logits[i], g.params, rngs[i])
                next_ids[i] = tok
                self._advance(g, tok, start)
                if on_event is not None:
                    delta = self._take_delta(g)
                    if delta or g.finish_reason is not None:
                        on_event(i, delta, g.finish_reason is not None)
            if all(g.finish_reason is not None for g in gens):
                break
            step_ids = next_ids.to(device)[:, None]
            ids = torch.cat([ids, step_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        return gens

    def _advance(self, g: Generation, tok: int, start: float) -> None:
        if g.first_token_s is None:
            g.first_token_s = time.perf_counter() - start
        if tok == self.eos_id:
            g.finish_reason = "stop"
            self._flush(g)
            return
        g.token_ids.append(tok)
        before = len(g.text)
        # incremental detokenization (decode only the last few tokens, not the whole completion):
        # text grows once the new tokens form complete characters
        prefix = self.tokenizer.decode(g.token_ids[g.prefix_offset:g.read_offset], skip_special_tokens=True)
        new = self.tokenizer.decode(g.token_ids[g.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            g.text += new[len(prefix):]
            g.prefix_offset, g.read_offset = g.read_offset, len(g.token_ids)
        if len(g.token_ids) >= g.params.max_tokens:
            g.finish_reason = "length"
            self._flush(g)
        if g.params.stop:  # only the tail can hold a new match
            window = max(0, before - max(len(s) for s in g.params.stop) + 1)
            cut = min((i for i in (g.text.find(s, window) for s in g.params.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                g.text, g.finish_reason = g.text[:cut], "stop"

    def _flush(self, g: Generation) -> None:
        """At the end, whatever tokens still wait for completing bytes become text as they are."""
        if g.read_offset < len(g.token_ids):
            prefix = self.tokenizer.decode(g.token_ids[g.prefix_offset:g.read_offset], skip_special_tokens=True)
            g.text += self.tokenizer.decode(g.token_ids[g.prefix_offset:], skip_special_tokens=True)[len(prefix):]
            g.prefix_offset = g.read_offset = len(g.token_ids)

    @staticmethod
    def _take_delta(g: Generation) -> str:
        """Text that can be streamed now: held back while it could still start a stop string or
        ends inside an incomplete multi-byte character."""
        end = len(g.text)
        if g.finish_reason is None:
            hold = max((len(s) - 1 for s in g.params.stop), default=0)
            end = max(g.emitted, end - hold)
            while end > g.emitted and g.text[end - 1] == "\ufffd":
                end -= 1
        delta = g.text[g.emitted:end]
        g.emitted = end
        return delta


def sample(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator) -> int:
    """One token from a 1-D logits vector: greedy at temperature 0, else top-k, then top-p
    (nucleus, the smallest set whose probability reaches ``top_p``), then a seeded draw."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=rng))

