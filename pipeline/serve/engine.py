"""Batched text generation with a KV cache: the pure-torch core of the serving stage.

A batch in flight is a ``Running``: its prompts are left-padded into one tensor, the first
forward pass fills the KV cache, then each ``step`` feeds one token per row and reuses the cache
(``use_cache=False`` recomputes the whole prefix every step, the baseline the cache is measured
against and must agree with token for token under greedy decoding). Batches are continuous:
``merge`` joins newly prefilled requests to the running batch between steps (the shorter side is
left-padded, its KV cache too, and masked out), and ``compact`` removes finished rows and the
padding no remaining row needs. ``Engine.generate`` runs a fixed set of requests to completion
on the same primitives. Each request keeps its own sampling parameters and its own seeded
``torch.Generator``, so a seeded request gives the same text alone or in any batch.

Nothing here knows about Ray, HTTP or asyncio (see ``batcher.py`` and ``app.py``)."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.model.build import context_length as config_context
from pipeline.serve import fastpath


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # log-probabilities under the model (its raw distribution, before temperature, top-k and
    # top-p): None = not computed; n >= 0 = each token's own and its n most likely alternatives
    logprobs: int | None = None  # of each generated token
    prompt_logprobs: int | None = None  # of each prompt token after the first (echo); max_tokens may then be 0
    # repetition penalties on the logits before sampling (greedy too), OpenAI's and vLLM's
    # definitions: presence subtracts its value from every token generated so far, frequency its
    # value times the token's count in the generation; repetition (vLLM's, 1 = none) divides the
    # positive logits of every token in the prompt or the generation by it and multiplies the
    # negative ones
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, value added to its logit), after the penalties
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's: no EOS and no stop string ends the text before min_tokens tokens; with ignore_eos an
    # EOS is a token like any other (it adds no text), so the text runs to max_tokens or a stop string
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only when scoring the prompt), got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {getattr(self, name)}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (0 < self.repetition_penalty and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} must be >= 0 and at most max_tokens ({self.max_tokens})")
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise ValueError(f"logit_bias: token ids must be >= 0 and values in [-100, 100], got {self.logit_bias}")

    @functools.cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``logit_bias`` as (ids, values) tensors, built once per request."""
        return (torch.tensor([t for t, _ in self.logit_bias], dtype=torch.long),
                torch.tensor([b for _, b in self.logit_bias], dtype=torch.float32))

    @property
    def penalized(self) -> bool:
        """Whether the logits change before sampling (penalties or a logit bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


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
    # with params.logprobs: one (token id, log-probability, [(id, log-probability)] of the most
    # likely tokens) per entry of token_ids, then one for the EOS when that ended the text; with
    # params.prompt_logprobs: the same for each prompt token, the first one's (nothing precedes
    # it) as (id, None, None)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None


# on_event(owner, text_delta, finished, generation): called after every step for rows that
# produced text; ``owner`` is what the caller attached to the row (its index in ``generate``)
EventFn = Callable[[Any, str, bool, "Generation"], None]


@dataclass
class Running:
    """A batch in flight: one row per request, left-padded. Invariant after each step: the KV cache
    holds every column of ``mask`` but the last, whose tokens (``next_ids``) are fed next."""

    owners: list
    gens: list[Generation]
    rngs: list[torch.Generator]
    ids: torch.Tensor  # [rows, columns]: prompt and generated tokens (the no-cache path feeds them all)
    mask: torch.Tensor  # [rows, columns]: 1 for real tokens, 0 for left padding
    start: float
    next_ids: torch.Tensor | None = None  # [rows, 1]; None until the prefill step ran
    cache: Any = None

    def __len__(self) -> int:
        return len(self.gens)


def _left_pad(t: torch.Tensor, n: int, value: int | float, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


def model_context(config, tokenizer) -> int:
    """The model config's context length; for a model that records none (relative positions only,
    e.g. BLOOM's ALiBi) the tokenizer's ``model_max_length`` when it states a real one."""
    limit = getattr(tokenizer, "model_max_length", None)
    fallback = limit if isinstance(limit, int) and 0 < limit < 10**7 else None
    try:
        return config_context(config, default=fallback)
    except ValueError as e:
        raise ValueError(f"{e} (the serve config's models[].context_length, or the tokenizer's "
                         f"model_max_length)") from None


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end a generation: the tokenizer's EOS and every EOS id the model's generation
    config names (a chat model's end of turn: Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``,
    which its tokenizer's EOS may not be), those that are tokens of the vocabulary."""
    from pipeline.model.build import token_id_list

    ids = [tokenizer.eos_token_id]
    for config in (getattr(model, "generation_config", None), model.config):
        named = token_id_list(getattr(config, "eos_token_id", None))
        ids.extend(named)
        if named:
            break  # the generation config speaks for the model where it names one
    n = len(tokenizer)
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, fast_path: bool = True,
                 context_length: int | None = None) -> None:
        self.model = model.eval()
        # GPT-2 and Llama: the lean forward of ``fastpath`` with its own KV cache; others: transformers
        self.fast = fastpath.decoder_for(model) if fast_path else None
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length or model_context(model.config, tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        # a model's output rows past the tokenizer's ids (vocabulary padded for fast matmuls) are
        # never sampled: the tokenizer could not decode them
        self.vocab = min(len(tokenizer), getattr(model.config, "vocab_size", None) or len(tokenizer))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt < 1:
            raise ValueError("the prompt is empty")
        if n_prompt + max_tokens > self.context_length:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                             f"length ({self.context_length})")

    def begin(self, requests: list[tuple[list[int], SamplingParams]], owners: list | None = None) -> Running:
        """A new batch of requests, not yet run (its first ``step`` is the prefill)."""
        gens = [Generation(prompt_ids=list(ids), params=p) for ids, p in requests]
        for g in gens:
            self.check_fits(len(g.prompt_ids), g.params.max_tokens)
        rngs = [torch.Generator().manual_seed(g.params.seed if g.params.seed is not None
                                              else int(torch.randint(0, 2**62, ()).item())) for g in gens]
        width = max(len(g.prompt_ids) for g in gens)
        ids = torch.full((len(gens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for i, g in enumerate(gens):  # left padding: every row's next token lands in the last column
            ids[i, width - len(g.prompt_ids):] = torch.tensor(g.prompt_ids)
            mask[i, width - len(g.prompt_ids):] = 1
        device = next(self.model.parameters()).device
        return Running(owners=list(range(len(gens)) if owners is None else owners), gens=gens, rngs=rngs,
                       ids=ids.to(device), mask=mask.to(device), start=time.perf_counter())

    @torch.inference_mode()
    def step(self, run: Running, *, use_cache: bool = True, on_event: EventFn | None = None,
             cancelled: Callable[[Any], bool] | None = None) -> None:
        """One forward pass (the whole prompt on the first step, then one token per row) and one
        sampled token per unfinished row. ``cancelled(owner)`` marks rows whose client left."""
        positions = (run.mask.cumsum(-1) - 1).clamp(min=0)
        if use_cache:
            feed = run.ids if run.next_ids is None else run.next_ids
            if self.fast is not None:
                if run.cache is None:
                    run.cache = fastpath.KVCache([], [], 0)
                logits = self.fast(feed, positions[:, -feed.shape[1]:], run.mask, run.cache)
            else:
                out = self.model(input_ids=feed, attention_mask=run.mask, cache=run.cache, use_cache=True,
                                 position_ids=positions[:, -feed.shape[1]:])
                run.cache, logits = out.cache, out.logits[:, -1]
        else:
            logits = self.model(input_ids=run.ids, attention_mask=run.mask, position_ids=positions,
                                use_cache=False).logits[:, -1]
        logits = logits[:, :self.vocab].float()
        prefill = run.next_ids is None
        if prefill and any(g.params.prompt_logprobs is not None for g in run.gens):
            self._score_prompts(run)
        next_ids = torch.full((len(run),), self.pad_id, dtype=torch.long)
        for i, g in enumerate(run.gens):
            if g.finish_reason is not None:
                continue
            if cancelled is not None and cancelled(run.owners[i]):
                g.finish_reason = "cancelled"
                continue
            if g.params.max_tokens == 0:  # the prompt scored, nothing to generate
                g.first_token_s, g.finish_reason = time.perf_counter() - run.start, "length"
                if on_event is not None:
                    on_event(run.owners[i], "", True, g)
                continue
            row = penalize(logits[i], g.prompt_ids, g.token_ids, g.params) if g.params.penalized else logits[i]
            if len(g.token_ids) < g.params.min_tokens and self.stop_ids:
                row = row.clone()
                row[list(self.stop_ids)] = float("-inf")
            tok = sample(row, g.params, run.rngs[i])
            next_ids[i] = tok
            if g.params.logprobs is not None:  # the EOS that ends a text too (evaluation harnesses count on it)
                if g.logprobs is None:
                    g.logprobs = []
                g.logprobs.append(_token_logprobs(logits[i], tok, g.params.logprobs))
            self._advance(g, tok, run.start)
            if on_event is not None:
                delta = self._take_delta(g)
                if delta or g.finish_reason is not None:
                    on_event(run.owners[i], delta, g.finish_reason is not None, g)
        run.next_ids = next_ids.to(run.ids.device)[:, None]
        run.ids = torch.cat([run.ids, run.next_ids], dim=1)
        run.mask = torch.cat([run.mask, torch.ones_like(run.next_ids)], dim=1)

    def _score_prompts(self, run: Running) -> None:
        """Each prompt token's log-probability given the tokens before it, for the rows that ask
        (echo with logprobs): a forward pass over each such prompt, apart from the cache, one row
        at a time (a whole context's logits for a batch of rows would take gigabytes)."""
        device = run.ids.device
        for g in run.gens:
            if g.params.prompt_logprobs is None:
                continue
            logits = self.model(input_ids=torch.tensor([g.prompt_ids], device=device), use_cache=False).logits[0]
            logits = logits[:-1, :self.vocab].float()
            g.prompt_logprobs = [(g.prompt_ids[0], None, None)] + [
                _token_logprobs(logits[j - 1], g.prompt_ids[j], g.params.prompt_logprobs)
                for j in range(1, len(g.prompt_ids))]

    def merge(self, run: Running, new: Running) -> Running:
        """Join ``new`` (after its prefill step) to ``run``: rows, tokens, mask and KV cache, the
        shorter side left-padded with masked columns. Returns ``run``, extended."""
        assert run.next_ids is not None and new.next_ids is not None, "merge runs after their prefill step"
        a, b = run.mask.shape[1], new.mask.shape[1]
        width = max(a, b)
        run.ids = torch.cat([_left_pad(run.ids, width - a, self.pad_id, 1), _left_pad(new.ids, width - b, self.pad_id, 1)])
        run.mask = torch.cat([_left_pad(run.mask, width - a, 0, 1), _left_pad(new.mask, width - b, 0, 1)])
        run.next_ids = torch.cat([run.next_ids, new.next_ids])
        if isinstance(run.cache, fastpath.KVCache):
            run.cache = fastpath.KVCache.merge(run.cache, new.cache, width - a, width - b)
        elif run.cache is not None:
            for la, lb in zip(run.cache.layers, new.cache.layers):
                la.keys = torch.cat([_left_pad(la.keys, width - a, 0.0, 2), _left_pad(lb.keys, width - b, 0.0, 2)])
                la.values = torch.cat([_left_pad(la.values, width - a, 0.0, 2), _left_pad(lb.values, width - b, 0.0, 2)])
        run.owners += new.owners
        run.gens += new.gens
        run.rngs += new.rngs
        return run

    def compact(self, run: Running) -> list[tuple[Any, Generation]]:
        """Remove finished rows (returned as (owner, generation)) and the leading columns that are
        padding in every remaining row."""
        keep = [i for i, g in enumerate(run.gens) if g.finish_reason is None]
        if len(keep) == len(run):
            return []
        done = [(run.owners[i], run.gens[i]) for i in range(len(run)) if run.gens[i].finish_reason is not None]
        idx = torch.tensor(keep, dtype=torch.long, device=run.ids.device)
        run.ids, run.mask = run.ids[idx], run.mask[idx]
        if run.next_ids is not None:
            run.next_ids = run.next_ids[idx]
        fast = isinstance(run.cache, fastpath.KVCache)
        layers = run.cache.layers if run.cache is not None and not fast else []
        if fast:
            run.cache.select(idx)
        for layer in layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        run.owners = [run.owners[i] for i in keep]
        run.gens = [run.gens[i] for i in keep]
        run.rngs = [run.rngs[i] for i in keep]
        if keep:
            lead = int((run.mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding leading columns
            if lead:
                run.ids, run.mask = run.ids[:, lead:], run.mask[:, lead:]
                if fast:
                    run.cache.drop_leading(lead)
                for layer in layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        return done

    def generate(self, requests: list[tuple[list[int], SamplingParams]], *, use_cache: bool = True,
                 on_event: EventFn | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Generation]:
        """Run a fixed batch to completion. ``cancelled(row)`` is polled every step: a row whose
        client has gone stops generating (finish reason "cancelled"); finished rows leave the
        batch, which ends when none is left."""
        if not requests:
            return []
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        run = self.begin(requests)
        gens = list(run.gens)
        while len(run):
            self.step(run, use_cache=use_cache, on_event=on_event, cancelled=cancelled)
            self.compact(run)
        return gens

    def _advance(self, g: Generation, tok: int, start: float) -> None:
        if g.first_token_s is None:
            g.first_token_s = time.perf_counter() - start
        if tok in self.stop_ids and not g.params.ignore_eos:
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
        if g.params.stop and len(g.token_ids) >= g.params.min_tokens:  # only the tail can hold a new match
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


def _token_logprobs(logits: torch.Tensor, tok: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """``tok``'s log-probability under 1-D ``logits`` and the ``top`` most likely tokens'."""
    lp = torch.log_softmax(logits, dim=-1)
    best = torch.topk(lp, min(top, lp.numel())) if top else None
    alternatives = [] if best is None else [(int(t), float(v)) for v, t in zip(best.values, best.indices)]
    return int(tok), float(lp[tok]), alternatives


def penalize(logits: torch.Tensor, prompt_ids: list[int], token_ids: list[int], p: SamplingParams) -> torch.Tensor:
    """1-D ``logits`` with ``p``'s repetition penalties, then its logit bias, applied (see
    SamplingParams), given the prompt and the tokens generated so far; a new tensor."""
    logits = logits.clone()
    if token_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(token_ids), minlength=logits.numel())[:logits.numel()].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(token_ids)), dtype=torch.long)
        seen = seen[seen < logits.numel()]
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.logit_bias:
        ids, values = p.bias_tensors
        keep = ids < logits.numel()
        logits.index_add_(0, ids[keep], values[keep].to(logits.dtype))
    return logits


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

