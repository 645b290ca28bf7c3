"""Perplexity and bits per byte of a causal LM on token rows or raw texts.

bits/byte = total negative log-likelihood (nats) / (ln 2 x UTF-8 bytes of the text scored): it
compares models with different tokenizers, which perplexity per token does not."""

from __future__ import annotations

import math

import torch


def context_length(model, requested: int) -> int:
    """``requested`` capped at the model's number of positions (longer inputs would index past
    the position table)."""
    from pipeline.model.build import context_length as limit

    return min(requested, limit(model.config, default=requested))


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL (nats) per row, ignoring padding."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    if attention_mask is not None:
        nll = nll * attention_mask[:, 1:]
    return nll.sum(dim=1)


def lm_metrics_from_rows(model, tok, rows: list[list[int]], batch_size: int = 8) -> dict:
    model.eval()
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        x = torch.tensor(rows[i : i + batch_size], dtype=torch.long)
        total_nll += float(sequence_nll(model, x).sum())
        total_tokens += x.shape[0] * (x.shape[1] - 1)
        total_bytes += sum(len(tok.decode(r[1:]).encode("utf-8")) for r in x.tolist())
    return _summary(total_nll, total_tokens, total_bytes)


def lm_metrics_from_texts(model, tok, texts: list[str], max_len: int, batch_size: int = 8) -> dict:
    """Each text scored on its own (truncated to ``max_len`` tokens, the first token unscored)."""
    model.eval()
    max_len = context_length(model, max_len)
    if tok.pad_token_id is None:  # GPT-2's and Llama's tokenizers have none; padding is masked out anyway
        import copy

        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(texts), batch_size):
        # right padding: a causal model numbers positions from the first column, so left padding
        # would shift every real token's position
        enc = tok(texts[i : i + batch_size], truncation=True, max_length=max_len, padding=True,
                  padding_side="right", return_tensors="pt")
        total_nll += float(sequence_nll(model, enc["input_ids"], enc["attention_mask"]).sum())
        total_tokens += int(enc["attention_mask"][:, 1:].sum())
        for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
            scored = [t for t, m in zip(ids[1:], mask[1:]) if m]
            total_bytes += len(tok.decode(scored).encode("utf-8"))
    return _summary(total_nll, total_tokens, total_bytes)


def _summary(nll: float, tokens: int, num_bytes: int) -> dict:
    loss = nll / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nll / (math.log(2) * max(1, num_bytes)),
            "tokens": tokens, "bytes": num_bytes}
