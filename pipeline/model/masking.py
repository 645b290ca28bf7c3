"""BERT's masked-LM corruption (Devlin et al. 2019, Section 3.1): 15% of the (non-special) tokens
are selected; of those 80% become the mask token, 10% a random token, 10% stay; the loss is on
the selected positions only (label -100 elsewhere)."""

from __future__ import annotations

import torch


def mask_tokens(
    input_ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: list[int], prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = input_ids.clone()
    probs = torch.full(input_ids.shape, prob)
    if special_ids:
        probs[torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))] = 0.0
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels[~selected] = -100
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)[to_random]
    return inputs, labels
