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
    """Sum of log p(option tokens | prompt) per option (options get a leading space), the options
    scored in one right-padded batch. The prompt opens with BOS where the tokenizer opens every
    text with one (Llama's: its model never saw a text without it), and is cut from the left,
    after that BOS, so that prompt + option fits ``max_len``."""
    from pipeline.evaluate.lm import context_length
    from pipeline.finetune.sft import adds_bos

    model.eval()
    max_len = context_length(model, max_len)
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    rows, n_opts = [], []
    for option in options:
        opt_ids = tok(" " + option, add_special_tokens=False)["input_ids"]
        ids = bos + (prompt_ids + opt_ids)[-(max_len - len(bos)):]
        rows.append(ids)
        n_opts.append(min(len(opt_ids), len(ids) - 1))
    width = max(map(len, rows))
    x = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])
    logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    token_lp = logp.gather(2, x[:, 1:, None])[..., 0]
    return [float(token_lp[i, len(ids) - 1 - n:len(ids) - 1].sum()) for i, (ids, n) in enumerate(zip(rows, n_opts))]


CONTENT_FREE = "N/A"


def draw_shots(train: list[tuple[str, str]], labels: list[str], k: int, seed: int = 0,
               exclude: set[str] | frozenset = frozenset()) -> list[tuple[str, str]]:
    """k examples, stratified round-robin over labels with a fixed seed, none of whose texts is in
    ``exclude`` (the queries: when the examples come from the queries' own file, a query must not
    be its own example)."""
    rng = random.Random(seed)
    by_label = {y: [t for t, lab in train if lab == y and t not in exclude] for y in labels}
    shots: list[tuple[str, str]] = []
    while len(shots) < k and any(by_label.values()):
        for y in labels:
            if by_label[y] and len(shots) < k:
                shots.append((by_label[y].pop(rng.randrange(len(by_label[y]))), y))
    rng.shuffle(shots)
    return shots


def score_queries(model, tok, shots: list[tuple[str, str]], queries: list[str], labels: list[str], max_len: int,
                  max_words: int = 40) -> list[list[float]]:
    """Each query's label log-likelihoods after the same examples."""
    return [option_logprobs(model, tok, build_prompt(shots, q, max_words), labels, max_len) for q in queries]


def decide(scores: list[list[float]], bias: list[float], labels: list[str]) -> tuple[list[str], list[str]]:
    """Predictions by raw label log-likelihood, and calibrated ones (contextual calibration, Zhao et
    al. 2021): each label's score minus its score for a content-free query ("N/A") after the same
    examples (``bias``), which removes the prompt's bias toward some labels (a small LM often picks
    one label for every query)."""
    best = range(len(labels))
    raw = [labels[max(best, key=s.__getitem__)] for s in scores]
    calibrated = [labels[max(best, key=lambda i: s[i] - bias[i])] for s in scores]
    return raw, calibrated


def fewshot_predict(model, tok, train: list[tuple[str, str]], queries: list[str], labels: list[str], k: int,
                    max_len: int, seed: int = 0, max_words: int = 40) -> tuple[list[str], list[str]]:
    """In process: ``draw_shots`` once (never a query), reused for all queries; ``decide``."""
    shots = draw_shots(train, labels, k, seed, exclude=set(queries))
    bias = option_logprobs(model, tok, build_prompt(shots, CONTENT_FREE, max_words), labels, max_len)
    return decide(score_queries(model, tok, shots, queries, labels, max_len, max_words), bias, labels)
