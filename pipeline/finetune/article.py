"""Article-level training of a sequence classifier over the windows of each text
(``data.window_training: article``).

With ``data.windows`` > 1 a classifier reads a long text as up to that many windows and pools
their predictions (``data.window_pooling``; evaluation and Serve do the same). Trained window by window, every
window is its own example with the text's label, though many windows of a news article say
nothing about its topic. Trained article by article, a step runs every window of each of its
texts and the loss is the negative log-likelihood of their pooled prediction (``pool_windows``):
the prediction that is scored, so the model learns from the whole text, as a bag-of-words
baseline reads it (BENCHMARKS.md: on the BBC demo, test macro-F1 0.964 over 3 seeds against 0.922
with the first window only). Pure torch and ``transformers``: nothing here knows about Ray.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from pipeline.finetune.classify_data import Windowing, encode_windows, pool_windows


def encode_articles(texts: list[str], labels: list[str], label2id: dict[str, int], tok, w: Windowing) -> list[dict]:
    """Training rows, one per text: its windows (up to ``w.windows``; the rest all padding, with an
    attention mask of zeros) as ``(windows, max_len)`` arrays, and its label."""
    enc, source = encode_windows(tok, texts, w, padding="max_length")
    pad = tok.pad_token_id
    ids = np.full((len(texts), w.windows, w.max_len), pad, dtype=np.int64)
    mask = np.zeros((len(texts), w.windows, w.max_len), dtype=np.int64)
    seen = [0] * len(texts)
    for row_ids, row_mask, src in zip(enc["input_ids"], enc["attention_mask"], source):
        ids[src, seen[src]], mask[src, seen[src]] = row_ids, row_mask
        seen[src] += 1
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": label2id[y]} for i, y in enumerate(labels)]


def sample_windows(present: torch.Tensor, k: int) -> torch.Tensor:
    """A random ``k`` of each text's windows: ``present`` (texts, windows), True where a window holds
    tokens; the result keeps ``k`` of each row's True entries, uniformly at random (all of them
    where a text has ``k`` or fewer). Draws from torch's global generator."""
    scores = torch.rand(present.shape, device=present.device).masked_fill(~present, 2.0)
    rank = scores.argsort(-1).argsort(-1)  # a text's present windows rank first, in random order
    return present & (rank < k)


class ArticleClassifier(torch.nn.Module):
    """A Hugging Face sequence classifier (``module``) applied to batches of texts read as windows:
    ``input_ids`` and ``attention_mask`` of shape (texts, windows, tokens), windows without any
    token skipped. Its logits are each text's log-probabilities, its windows pooled as evaluation
    and serving pool them (``pool_windows``, the reading saved in the classifier's config), its loss
    their negative log-likelihood (labels of -100 ignored). In training, ``train_windows`` > 0 reads
    a random ``train_windows`` of each text's windows (``sample_windows``). Checkpoints save ``module`` alone (it is
    reached through ``module`` like a DDP wrapper's model), a plain classifier."""

    def __init__(self, module: torch.nn.Module, aux_lm_weight: float = 0.0, aux_lm_share: float = 1.0,
                 train_windows: int = 0):
        super().__init__()
        self.module = module
        self.aux_lm_weight, self.aux_lm_share, self.train_windows = aux_lm_weight, aux_lm_share, train_windows

    @property
    def config(self):
        return self.module.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        present = attention_mask.bool().any(-1)  # (texts, windows)
        if self.training and labels is not None and self.train_windows:
            present = sample_windows(present, self.train_windows)
        ids, mask, owner = input_ids[present], attention_mask[present], present.nonzero()[:, 0]
        aux = self.training and labels is not None and self.aux_lm_weight > 0
        out = self.module(input_ids=ids, attention_mask=mask, output_hidden_states=aux)
        pooling = getattr(self.config, "window_pooling", None) or "probs"
        log_probs = pool_windows(out.logits, owner, input_ids.shape[0], pooling)
        loss = None if labels is None else torch.nn.functional.nll_loss(log_probs, labels, ignore_index=-100)
        if aux:
            keep = (labels != -100)[owner]  # filler rows carry no loss of either kind
            loss = loss + self.aux_lm_weight * self.next_token_loss(out.hidden_states[-1][keep], ids[keep], mask[keep])
        return SequenceClassifierOutput(loss=loss, logits=log_probs)

    def next_token_loss(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The auxiliary language-modeling loss of the windows (GPT-1's fine-tuning objective: it keeps
        the representations general while the classification loss alone soon memorizes the training
        texts): next-token cross-entropy from the final hidden states through the input embeddings
        (tied, as the base LM's head is), on a random ``aux_lm_share`` of the positions, since the
        vocabulary-wide projection costs more than the rest of the step."""
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).flatten()
        picked = (targets != -100).nonzero()[:, 0]
        if len(picked) == 0:
            return hidden.sum() * 0.0
        if self.aux_lm_share < 1:
            keep = max(1, round(len(picked) * self.aux_lm_share))
            picked = picked[torch.randperm(len(picked), device=picked.device)[:keep]]
        states = hidden[:, :-1].flatten(0, 1)[picked]
        logits = states @ self.module.get_input_embeddings().weight.T
        return torch.nn.functional.cross_entropy(logits.float(), targets[picked])
