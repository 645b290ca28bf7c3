"""Few-shot in-context classification for a causal LM (GPT-3 style, Brown et al. 2020): k labeled
examples in the prompt, then the query; each label is scored by the log-likelihood of its tokens
after the prompt and the best-scoring label is the prediction."""

from __future__ import annotations

import random

import torch

TEMPLATE = "Text: {text}\nLabel:{label}\n\n"


def clip_words(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words])


def build_prompt(examples: list[tuple[str, str]], query: str, max_words: int = 40) -> str:
    shots = "".join(TEMPLATE.format(text=clip_words(t, max_words), label=f" {y}") for t, y in examples)
    return shots + f"Text: {clip_words(query, max_words)}\nLabel:"


@torch.no_grad()
def option_logprobs(model, tok, prompt: str, options: list[str], max_len: int) -> list[float]:
    """Sum of log p(option tokens | prompt) per option (options get a leading space). The prompt is
    cut from the left so that prompt + option fits ``max_len``."""
    from pipeline.evaluate.lm import context_length

    model.eval()
    max_len = context_length(model, max_len)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for option in options:
        opt_ids = tok(" " + option, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + opt_ids)[-max_len:]
        n_opt = min(len(opt_ids), len(ids) - 1)
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
        targets = x[0, 1:]
        token_lp = logp.gather(1, targets[:, None])[:, 0]
        scores.append(float(token_lp[-n_opt:].sum()))
    return scores


CONTENT_FREE = "N/A"


def fewshot_predict(model, tok, train: list[tuple[str, str]], queries: list[str], labels: list[str], k: int,
                    max_len: int, seed: int = 0, max_words: int = 40) -> tuple[list[str], list[str]]:
    """k examples drawn (stratified round-robin over labels, fixed seed) once, reused for all queries.
    Returns the predictions by raw label log-likelihood, and calibrated ones (contextual
    calibration, Zhao et al. 2021): each label's score minus its score for a content-free query
    ("N/A") after the same examples, which removes the prompt's bias toward some labels (a small
    LM often picks one label for every query)."""
    rng = random.Random(seed)
    by_label = {y: [t for t, lab in train if lab == y] for y in labels}
    shots: list[tuple[str, str]] = []
    while len(shots) < k and any(by_label.values()):
        for y in labels:
            if by_label[y] and len(shots) < k:
                shots.append((by_label[y].pop(rng.randrange(len(by_label[y]))), y))
    rng.shuffle(shots)
    bias = option_logprobs(model, tok, build_prompt(shots, CONTENT_FREE, max_words), labels, max_len)
    raw, calibrated = [], []
    best = range(len(labels))
    for q in queries:
        scores = option_logprobs(model, tok, build_prompt(shots, q, max_words), labels, max_len)
        raw.append(labels[max(best, key=scores.__getitem__)])
        calibrated.append(labels[max(best, key=lambda i: scores[i] - bias[i])])
    return raw, calibrated
