"""Learning-rate schedule: linear warmup then cosine decay to ``min_lr`` (as in nanoGPT/GPT-3)."""

from __future__ import annotations

import math


def get_lr(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    # 1) linear warmup from lr/warmup to lr
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    # 2) after the schedule: stay at the floor
    if step >= max_steps:
        return min_lr
    # 3) cosine from lr down to min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def schedule_warning(*, lr: float, warmup_steps: int, max_steps: int) -> str | None:
    """Why the schedule cannot be what the config asks for, or None: a warmup as long as the run
    never reaches ``lr`` (the last step's rate is ``lr * max_steps / warmup_steps``) and never decays."""
    if warmup_steps <= max_steps:
        return None
    return (f"optim.warmup_steps ({warmup_steps}) > train.max_steps ({max_steps}): the learning rate rises through the "
            f"whole run, peaks at {get_lr(max_steps - 1, lr=lr, warmup_steps=warmup_steps, max_steps=max_steps, min_lr=0):.3g} "
            f"instead of optim.lr ({lr:g}) and never decays")
