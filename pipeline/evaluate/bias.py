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
    """The shipped template set, or a file of pairs (a local path or any fsspec URI): JSONL records
    ``{template (with {}), stereotyped, anti, category}``, or sentence pairs in CrowS-Pairs' columns
    ``{sent_more, sent_less, bias_type}`` (the more stereotyping sentence first), in JSONL or CSV (as
    CrowS-Pairs ships). A sentence pair becomes the template ``{}`` filled with either sentence."""
    from pipeline.data.sources import detect_format

    if path is None:
        raw = resources.files("pipeline").joinpath("resources/bias_pairs.jsonl").read_text(encoding="utf-8")
        records = _json_lines(raw)
    elif detect_format(path) == "csv":
        import csv

        from pipeline.data.sources import csv_rows, path_kind

        if path_kind(path) != "file":
            raise ValueError(f"bias.pairs_path {path}: not found (a file)")
        try:  # line numbers as a spreadsheet shows them: the header is line 1
            records = [(i, row) for i, row in enumerate(csv_rows(path), start=2)]
        except csv.Error as exc:
            raise ValueError(f"bias.pairs_path {path}: not a readable CSV file ({exc})") from None
    else:
        from pipeline.data.sources import read_small_text

        try:
            raw = read_small_text(path)
        except ValueError as exc:
            raise ValueError(f"bias.pairs_path {exc}") from None
        records = _json_lines(raw)
    return [_pair(p, i) for i, p in records]


def _json_lines(raw: str) -> list[tuple[int, object]]:
    out = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"bias pairs line {i}: {exc}") from None
    return out


def _pair(p, line: int) -> dict:
    def text(key: str) -> bool:
        return isinstance(p.get(key), str) and bool(p[key].strip())

    if isinstance(p, dict) and text("sent_more") and text("sent_less"):
        return {"category": p["bias_type"] if text("bias_type") else "unspecified", "template": "{}",
                "stereotyped": p["sent_more"], "anti": p["sent_less"]}
    if isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("template", "stereotyped", "anti", "category")) \
            and "{}" in p["template"]:
        return p
    raise ValueError(f"bias pairs line {line}: needs template (with {{}}), stereotyped, anti, category; or sent_more, "
                     f"sent_less (+ bias_type), as in CrowS-Pairs")


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


def check_pairs_fit(tok, config, pairs: list[dict]) -> None:
    """Every sentence of ``pairs`` fits the model's context (checked before any scoring)."""
    from pipeline.model.build import context_length

    limit = context_length(config, default=1 << 30)
    for p in pairs:
        for term in (p["stereotyped"], p["anti"]):
            text = p["template"].format(term)
            n = len(tok(text)["input_ids"])
            if n > limit:
                raise ValueError(f"bias pair sentence {text[:60]!r}: {n} tokens, more than the model's context "
                                 f"length ({limit})")


@torch.no_grad()
def pair_gaps(model, tok, pairs: list[dict], masked: bool = False) -> list[float]:
    """log p(stereotyped sentence) - log p(anti-stereotyped sentence) per pair. ``masked``: the
    model is a masked LM, scored by pseudo-log-likelihood."""
    model.eval()
    special = sorted(set(tok.all_special_ids))
    check_pairs_fit(tok, model.config, pairs)

    def loglik(text: str) -> float:
        ids = tok(text, return_tensors="pt")["input_ids"]
        if masked:
            return pseudo_log_likelihood(model, ids, tok.mask_token_id, special)
        return -float(sequence_nll(model, ids)[0])  # the whole sentence (the first token is not predicted)

    return [loglik(p["template"].format(p["stereotyped"])) - loglik(p["template"].format(p["anti"])) for p in pairs]


def summarize_gaps(gaps: list[float], categories: list[str]) -> dict:
    g, cats = np.array(gaps), np.array(categories)
    by_cat = {c: {"mean_gap": float(g[cats == c].mean()), "share_stereotyped": float((g[cats == c] > 0).mean()),
                  "n": int((cats == c).sum())} for c in sorted(set(categories))}
    return {"n": len(gaps), "mean_gap": float(g.mean()), "median_gap": float(np.median(g)),
            "share_stereotyped": float((g > 0).mean()), "by_category": by_cat, "gaps": list(map(float, gaps))}


def counterfactual_probe(model, tok, pairs: list[dict], masked: bool = False) -> dict:
    """In process: ``pair_gaps`` summarized overall and per category."""
    return summarize_gaps(pair_gaps(model, tok, pairs, masked), [p["category"] for p in pairs])


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
