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
                          masked: MaskedScorer | None = None, overlap: int | None = None) -> dict:
    """Each text scored whole, on its own, in windows of ``max_len`` tokens (``document_windows``;
    with ``masked``, a masked LM's loss at the corrupted positions of each window)."""
    totals = [0.0, 0, 0]
    for i in range(0, len(texts), batch_size):
        for k, v in enumerate(text_batch_totals(model, tok, texts[i : i + batch_size], max_len, masked, overlap)):
            totals[k] += v
    return _summary(float(totals[0]), int(totals[1]), int(totals[2]), "causal" if masked is None else "masked")


def default_overlap(max_len: int) -> int:
    """Context carried into a document's next window when none is set: a quarter of the window."""
    return max(1, max_len // 4)


def document_windows(ids: list[int], max_len: int, overlap: int) -> list[tuple[list[int], int]]:
    """``(window, context)`` pairs covering a document's token ids with windows of at most
    ``max_len`` tokens, whose first ``context`` tokens are only read: every token but the first
    (which nothing predicts) is scored exactly once. Each window after the first repeats the
    ``overlap`` tokens before its new ones (1 <= overlap < max_len), so they are scored with that
    much context at least, as a sliding-window perplexity is computed for a model whose context is
    shorter than the document."""
    if not 1 <= overlap < max_len:
        raise ValueError(f"window overlap must be in [1, {max_len - 1}] for {max_len}-token windows, got {overlap}")
    out, end = [(ids[:max_len], 1)], min(len(ids), max_len)
    while end < len(ids):
        start = end - overlap
        out.append((ids[start : start + max_len], overlap))
        end = min(len(ids), start + max_len)
    return out


def text_batch_totals(model, tok, texts: list[str], max_len: int, masked: MaskedScorer | None = None,
                      overlap: int | None = None, windows_per_pass: int = 8) -> tuple[float, int, int]:
    """Summed NLL, scored tokens and their bytes (0 for a masked LM) of one batch of texts, each
    read whole: a causal LM's in ``document_windows`` of ``max_len`` tokens (the model's context at
    most) carrying ``overlap`` tokens of context (default ``default_overlap``); a masked LM's in
    disjoint windows, each corrupted and scored as a training row is."""
    model.eval()
    max_len = context_length(model, max_len)
    docs = tok(texts, verbose=False)["input_ids"]  # whole: no truncation
    if masked is not None:
        windows = [(ids[i : i + max_len], 0) for ids in docs for i in range(0, len(ids), max_len)]
    else:
        windows = [w for ids in docs for w in document_windows(ids, max_len, overlap or default_overlap(max_len))]
    windows = [(w, context) for w, context in windows if len(w) > context]  # a one-token text scores nothing
    nll, tokens = 0.0, 0
    for i in range(0, len(windows), windows_per_pass):
        group = windows[i : i + windows_per_pass]
        width = max(len(w) for w, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        attention = torch.zeros(len(group), width, dtype=torch.long)
        scored = torch.zeros(len(group), width, dtype=torch.bool)
        for row, (w, context) in enumerate(group):  # right padding: a causal model numbers positions from the first column
            x[row, : len(w)], attention[row, : len(w)], scored[row, context : len(w)] = torch.tensor(w), 1, True
        if masked is not None:
            n, c = masked(model, x, attention)
            nll, tokens = nll + float(n.sum()), tokens + int(c.sum())
            continue
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=attention).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        nll += float((token_nll * scored[:, 1:]).sum())
        tokens += int(scored[:, 1:].sum())
    num_bytes = 0 if masked is not None else sum(len(tok.decode(ids[1:]).encode("utf-8")) for ids in docs)
    return nll, tokens, num_bytes


def _summary(nll: float, tokens: int, num_bytes: int, objective: str = "causal") -> dict:
    """Loss and perplexity per scored token; bits per byte for a causal LM (a masked LM scores
    15% of the tokens, each seeing the others: no per-byte figure)."""
    loss = nll / max(1, tokens)
    causal = objective == "causal"
    return {"objective": objective, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nll / (math.log(2) * max(1, num_bytes)) if causal else None,
            "tokens": tokens, "bytes": num_bytes if causal else None}
