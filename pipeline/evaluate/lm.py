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


class MaskedScorer:
    """A masked LM's loss: each row corrupted as in training (``pipeline.model.masking``: 15% of
    its non-special tokens, 80/10/10), the NLL of the original tokens at the selected positions.
    A row's corruption is seeded by its own tokens, so a score does not depend on the batch, the
    actor or the order rows arrive in."""

    def __init__(self, tok) -> None:
        self.mask_id = tok.mask_token_id
        if self.mask_id is None:
            raise ValueError("the masked LM's tokenizer has no mask token")
        self.vocab = len(tok)
        self.special = sorted(set(tok.all_special_ids))

    @torch.no_grad()
    def __call__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(summed NLL per row, scored tokens per row)."""
        import zlib

        from pipeline.model.masking import mask_tokens

        inputs, labels = input_ids.clone(), torch.full_like(input_ids, -100)
        for i, row in enumerate(input_ids):
            n = int(attention_mask[i].sum()) if attention_mask is not None else row.numel()
            g = torch.Generator().manual_seed(zlib.crc32(row[:n].numpy().astype("int64").tobytes()))
            inputs[i, :n], labels[i, :n] = mask_tokens(row[:n], self.mask_id, self.vocab, self.special, generator=g)
        logits = model(input_ids=inputs, attention_mask=attention_mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        return nll.sum(dim=1), (labels != -100).sum(dim=1)


def load_lm(model_dir: str):
    """A causal LM, or a masked LM (``is_masked_lm``) with its ``MaskedScorer`` (else None)."""
    import transformers

    from pipeline.model.build import is_masked_lm, load_pretrained

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    masked = is_masked_lm(transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True))
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = load_pretrained(auto, model_dir).eval()
    return model, tok, (MaskedScorer(tok) if masked else None)


def lm_metrics_from_rows(model, tok, rows: list[list[int]], batch_size: int = 8) -> dict:
    model.eval()
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        x = torch.tensor(rows[i : i + batch_size], dtype=torch.long)
        total_nll += float(sequence_nll(model, x).sum())
        total_tokens += x.shape[0] * (x.shape[1] - 1)
        total_bytes += sum(len(tok.decode(r[1:]).encode("utf-8")) for r in x.tolist())
    return _summary(total_nll, total_tokens, total_bytes)


def lm_metrics_from_texts(model, tok, texts: list[str], max_len: int, batch_size: int = 8,
                          masked: MaskedScorer | None = None) -> dict:
    """Each text scored on its own (truncated to ``max_len`` tokens, the first token unscored;
    with ``masked``, a masked LM's loss at the corrupted positions)."""
    totals = [0.0, 0, 0]
    for i in range(0, len(texts), batch_size):
        for k, v in enumerate(text_batch_totals(model, tok, texts[i : i + batch_size], max_len, masked)):
            totals[k] += v
    return _summary(float(totals[0]), int(totals[1]), int(totals[2]), "causal" if masked is None else "masked")


def text_batch_totals(model, tok, texts: list[str], max_len: int, masked: MaskedScorer | None = None) -> tuple[float, int, int]:
    """Summed NLL, scored tokens and their bytes (0 for a masked LM) of one batch of texts, each
    truncated to ``max_len`` tokens."""
    model.eval()
    max_len = context_length(model, max_len)
    if tok.pad_token_id is None:  # GPT-2's and Llama's tokenizers have none; padding is masked out anyway
        import copy

        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    # right padding: a causal model numbers positions from the first column, so left padding
    # would shift every real token's position
    enc = tok(texts, truncation=True, max_length=max_len, padding=True, padding_side="right", return_tensors="pt")
    if masked is not None:
        nll, counts = masked(model, enc["input_ids"], enc["attention_mask"])
        return float(nll.sum()), int(counts.sum()), 0
    nll = float(sequence_nll(model, enc["input_ids"], enc["attention_mask"]).sum())
    num_bytes = 0
    for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
        num_bytes += len(tok.decode([t for t, m in zip(ids[1:], mask[1:]) if m]).encode("utf-8"))
    return nll, int(enc["attention_mask"][:, 1:].sum()), num_bytes


def _summary(nll: float, tokens: int, num_bytes: int, objective: str = "causal") -> dict:
    """Loss and perplexity per scored token; bits per byte for a causal LM (a masked LM scores
    15% of the tokens, each seeing the others: no per-byte figure)."""
    loss = nll / max(1, tokens)
    causal = objective == "causal"
    return {"objective": objective, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nll / (math.log(2) * max(1, num_bytes)) if causal else None,
            "tokens": tokens, "bytes": num_bytes if causal else None}
