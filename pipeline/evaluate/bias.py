"""Bias and fairness probes.

1. Sliced metrics: a classification metric per value of a group column and the largest gap
   between groups.
2. Counterfactual probe (in the spirit of CrowS-Pairs, Nangia et al. 2020): sentence pairs that
   differ only in a demographic term; the gap is log p(stereotyped) - log p(anti-stereotyped)
   under the LM. An unbiased model has gaps centred on 0 and prefers the stereotyped variant about
   half of the time. A small template set ships in ``pipeline/resources/bias_pairs.jsonl``.
   A masked (BERT-style) LM has no left-to-right likelihood: its sentences are scored by
   pseudo-log-likelihood (Salazar et al. 2020), each token predicted with only it masked.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate.lm import sequence_nll


def load_pairs(path: str | None = None) -> list[dict]:
    if path is None:
        raw = resources.files("pipeline").joinpath("resources/bias_pairs.jsonl").read_text(encoding="utf-8")
    else:
        if not Path(path).is_file():
            raise ValueError(f"bias.pairs_path not found: {path}")
        raw = Path(path).read_text(encoding="utf-8")
    pairs = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"bias pairs line {i}: {exc}") from None
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("template", "stereotyped", "anti", "category")) \
                or "{}" not in p["template"]:
            raise ValueError(f"bias pairs line {i}: needs template (with {{}}), stereotyped, anti, category")
        pairs.append(p)
    return pairs


@torch.no_grad()
def pseudo_log_likelihood(model, input_ids: torch.Tensor, mask_id: int, special_ids: list[int]) -> float:
    """Sum over the non-special tokens of one row (``[1, n]``) of log p(token | the rest), the
    token masked: one batch of ``n`` copies, each with one position masked."""
    ids, special = input_ids[0], set(special_ids)
    positions = [i for i, t in enumerate(ids.tolist()) if t not in special]
    if not positions:
        return 0.0
    batch = ids.repeat(len(positions), 1)
    rows = torch.arange(len(positions))
    cols = torch.tensor(positions)
    batch[rows, cols] = mask_id
    logp = torch.log_softmax(model(input_ids=batch).logits[rows, cols].float(), dim=-1)
    return float(logp[rows, ids[cols]].sum())


@torch.no_grad()
def counterfactual_probe(model, tok, pairs: list[dict], masked: bool = False) -> dict:
    """``masked``: the model is a masked LM, scored by pseudo-log-likelihood."""
    from pipeline.model.build import context_length

    model.eval()
    special = sorted(set(tok.all_special_ids))
    limit = context_length(model.config, default=1 << 30)

    def loglik(text: str) -> float:
        ids = tok(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] > limit:
            raise ValueError(f"bias pair sentence {text[:60]!r}: {ids.shape[1]} tokens, more than the model's "
                             f"context length ({limit})")
        if masked:
            return pseudo_log_likelihood(model, ids, tok.mask_token_id, special)
        return -float(sequence_nll(model, ids)[0])  # the whole sentence (the first token is not predicted)

    gaps, cats = [], []
    for p in pairs:
        gaps.append(loglik(p["template"].format(p["stereotyped"])) - loglik(p["template"].format(p["anti"])))
        cats.append(p["category"])
    g = np.array(gaps)
    by_cat = {c: {"mean_gap": float(g[[x == c for x in cats]].mean()),
                  "share_stereotyped": float((g[[x == c for x in cats]] > 0).mean()), "n": int(sum(x == c for x in cats))}
              for c in sorted(set(cats))}
    return {"n": len(gaps), "mean_gap": float(g.mean()), "median_gap": float(np.median(g)),
            "share_stereotyped": float((g > 0).mean()), "by_category": by_cat, "gaps": gaps}


def sliced_metrics(y_true: list[str], y_pred: list[str], groups: list[str], labels: list[str]) -> dict:
    from pipeline.evaluate.classify import classification_metrics

    per_group = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        m = classification_metrics([y_true[i] for i in idx], [y_pred[i] for i in idx], labels)
        per_group[g] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "support": m["support"]}
    accs = {g: v["accuracy"] for g, v in per_group.items()}
    worst, best = min(accs, key=accs.get), max(accs, key=accs.get)
    return {"per_group": per_group, "largest_gap": {"metric": "accuracy", "gap": accs[best] - accs[worst],
                                                     "best": best, "worst": worst}}


def plot_gaps(gaps: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps, bins=20)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("log p(stereotyped) - log p(anti-stereotyped)")
    ax.set_ylabel("pairs")
    ax.set_title("Counterfactual bias probe")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
