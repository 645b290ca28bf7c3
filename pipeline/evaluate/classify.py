"""Classification metrics with scikit-learn, a TF-IDF + logistic-regression baseline on the same
split, a paired comparison of two classifiers on it, and a confusion-matrix plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(y_true, y_pred)), "support": len(y_true), "labels": labels}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_label"] = {y: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
                        for y, a, b, c, d in zip(labels, p, r, f, s)}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _macro_f1_of_resamples(y: np.ndarray, pred: np.ndarray, idx: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 over the first ``n_labels`` codes (scikit-learn's, zero_division=0) of every row of
    resampled example indices ``idx`` (resamples, n). ``y`` and ``pred`` hold integer codes; a
    prediction code of ``n_labels`` (no known label) is a miss."""
    r = idx.shape[0]
    offset = (np.arange(r) * (n_labels + 1))[:, None]
    counts = lambda codes, weights=None: np.bincount((codes + offset).ravel(), weights=weights,
                                                    minlength=r * (n_labels + 1)).reshape(r, n_labels + 1)[:, :n_labels]
    yt, yp = y[idx], pred[idx]
    tp = counts(yt, (yt == yp).ravel().astype(float))
    denom = counts(yt) + counts(yp)
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(1)


def paired_comparison(y_true: list[str], pred_a: list[str], pred_b: list[str], labels: list[str],
                      resamples: int = 2000, seed: int = 0) -> dict:
    """Classifier A against classifier B on the same examples: how many examples only one of them
    gets right, the exact two-sided McNemar test on those (the chance of a split at least this
    uneven if both were equally accurate), and the difference of macro-F1 (A - B) with a 95%
    paired bootstrap interval (the same resampled examples for both). On a few hundred examples a
    gap of one or two examples is inside these bounds: the report says so instead of leaving a
    reader to rank two classifiers on noise."""
    code = {y: i for i, y in enumerate(labels)}
    n_labels = len(labels)
    y = np.array([code[t] for t in y_true])
    a = np.array([code.get(t, n_labels) for t in pred_a])
    b = np.array([code.get(t, n_labels) for t in pred_b])
    only_a, only_b = int(((a == y) & (b != y)).sum()), int(((a != y) & (b == y)).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    diff = lambda idx: _macro_f1_of_resamples(y, a, idx, n_labels) - _macro_f1_of_resamples(y, b, idx, n_labels)
    lo, hi = np.percentile(diff(np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))), [2.5, 97.5])
    return {"only_a_correct": only_a, "only_b_correct": only_b, "mcnemar_exact_p": p,
            "f1_macro_diff": float(diff(np.arange(len(y))[None, :])[0]), "f1_macro_diff_ci95": [float(lo), float(hi)],
            "bootstrap_resamples": resamples}


def tfidf_baseline(train_texts: list[str], train_labels: list[str], test_texts: list[str], seed: int = 0) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
                        LogisticRegression(max_iter=2000, C=10.0, random_state=seed))
    clf.fit(train_texts, train_labels)
    return list(clf.predict(test_texts))


def reading(model, max_len: int | None = None):
    """How to read texts for ``model``: the windowing saved with it at fine-tuning, with
    ``max_len`` (if given) replacing its window length; capped at the model's positions."""
    from dataclasses import replace

    from pipeline.evaluate.lm import context_length
    from pipeline.finetune.classify_data import Windowing

    limit = context_length(model, 1 << 30)
    w = Windowing.of(model.config, min(256, limit))
    if max_len is not None:
        w = replace(w, max_len=max_len, overlap=min(w.overlap, max(0, max_len // 2 - 1)))
    return replace(w, max_len=min(w.max_len, limit))


def read_spans(tok, texts: list[str], w) -> list[str]:
    """The part of each text a classifier with reading ``w`` (a ``Windowing``) sees: the
    characters its windows cover. A bag-of-words baseline trained and tested on these spans shows
    what the same input is worth, apart from how much of the text is read."""
    from pipeline.finetune.classify_data import encode_windows

    if not getattr(tok, "is_fast", False):  # one window only (encode_windows says so otherwise)
        enc, _ = encode_windows(tok, texts, w, padding=False)
        return [tok.decode(ids, skip_special_tokens=True) for ids in enc["input_ids"]]
    enc, source = encode_windows(tok, texts, w, padding=False, return_offsets_mapping=True)
    end = [0] * len(texts)
    for offsets, i in zip(enc["offset_mapping"], source):
        end[i] = max([end[i]] + [int(b) for _, b in offsets])
    return [t[:e] for t, e in zip(texts, end)]


@torch.no_grad()
def classify_probs(model, tok, texts: list[str], max_len: int | None = None, batch_size: int = 16) -> tuple[torch.Tensor, int]:
    """Label probabilities per text (rows follow ``model.config.id2label``), its windows pooled
    as the classifier was trained to pool them, and the number of tokens read."""
    from pipeline.finetune.classify_data import encode_windows, pool_windows

    model.eval()
    w = reading(model, max_len)
    out, tokens = [], 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc, source = encode_windows(tok, chunk, w, padding=True, return_tensors="pt")
        logits = torch.cat([model(input_ids=enc["input_ids"][j:j + batch_size],
                                  attention_mask=enc["attention_mask"][j:j + batch_size]).logits.float()
                            for j in range(0, len(source), batch_size)])
        out.append(pool_windows(logits, torch.tensor(source), len(chunk), w.pooling).exp())
        tokens += int(enc["attention_mask"].sum())
    n_labels = len(model.config.id2label)
    return (torch.cat(out) if out else torch.zeros(0, n_labels)), tokens


def predict_labels(model, tok, texts: list[str], max_len: int | None = None, batch_size: int = 16) -> list[str]:
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    probs, _ = classify_probs(model, tok, texts, max_len, batch_size)
    return [id2label[int(j)] for j in probs.argmax(-1)]


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
