"""Does a classifier trained on whole articles close the gap to TF-IDF?

The pipeline's classifier reads each article's first ``max_len`` tokens, or with ``data.windows``
up to W windows, each trained on as a separate example with the article's label. This study
trains article-level instead (multiple-instance learning): a step takes B articles, runs every
window of each (up to ``--windows``), and the loss is the negative log-likelihood of the
article's pooled prediction (``--pool probs``: the mean of its windows' probabilities; ``logits``:
the softmax of the mean of their logits), the prediction the evaluate job and Serve make from
windows; ``tokens`` (study only) applies the head at every token and averages over all the
article's tokens. ``--aux-lm W`` adds the pipeline's auxiliary next-token loss (``aux_lm_weight``,
on ``--aux-lm-share`` of the positions). So the model learns from the whole article at once, as TF-IDF reads it. ``--windows 1``
is the pipeline's former recipe (one window, plain cross-entropy) through the same code: the
baseline of the same run.

    python benchmarks/classifier_article_level.py --prepared outputs/prepare/<run> \
        --base outputs/pretrain/<run>/model [--windows 1,8] [--pool probs,logits] [--seeds 0,1,2] \
        [--steps 300] [--cv K] [--lr 1e-3] [--layer-decay 1.0] [--embedding-lr-mult 1.0] [--predictions] [--json out.json]

No Ray: one process, the pipeline's optimizer, schedule, precision, data encoding and pooling.
Reports macro-F1 at the last step, at the step with the best val accuracy (the pipeline's
``val_accuracy`` export rule), and of two weight averages of the same run (an EMA, and the mean
over the last third of the steps), with TF-IDF + LogisticRegression on the same split. With
``--cv K`` each run trains on K-1 parts of the training split and is also scored on the part it
left out (``heldout``): choosing a recipe on all K held-out parts scores it on every training
article, where the validation split holds a hundred, and keeps the test split out of the choice.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402


def encode(tok, texts: list[str], w) -> tuple:
    """Every text's windows: (input_ids, attention_mask) tensors and, per text, its window rows."""
    import torch

    from pipeline.finetune.classify_data import encode_windows

    enc, source = encode_windows(tok, texts, w, padding="max_length", return_tensors="pt")
    rows: list[list[int]] = [[] for _ in texts]
    for j, src in enumerate(source):
        rows[src].append(j)
    return torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"]), rows


def article_log_probs(model, ids, mask, rows: list[list[int]], articles: list[int], precision: str,
                      pool: str = "probs", lm_loss: bool = False, lm_share: float = 1.0, sample: int = 0):
    """(len(articles), classes): each article's log-probabilities, its windows pooled as the
    pipeline pools them (``pool_windows``: ``probs``, the mean of the windows' probabilities, or
    ``logits``, the softmax of the mean of their logits). ``sample`` > 0 reads a random ``sample``
    of each article's windows (``sample_windows``, the pipeline's ``data.train_windows``)."""
    import torch

    from pipeline.finetune.article import sample_windows
    from pipeline.finetune.classify_data import pool_windows
    from pipeline.train.loop import autocast_context

    if sample:
        counts = torch.tensor([len(rows[a]) for a in articles])
        keep = sample_windows(torch.arange(int(counts.max()))[None, :] < counts[:, None], sample)
        rows = {a: [rows[a][i] for i in keep[k].nonzero()[:, 0].tolist()] for k, a in enumerate(articles)}
    flat = [j for a in articles for j in rows[a]]
    owner = torch.tensor([k for k, a in enumerate(articles) for _ in rows[a]])
    with autocast_context(torch.device("cpu"), precision):
        if pool == "tokens":  # the head at every token, averaged over all the article's tokens
            m = mask[flat]
            hidden = model.base_model(input_ids=ids[flat], attention_mask=m).last_hidden_state
            per_token = model.score(hidden).float() * m.unsqueeze(-1)
            sums = torch.zeros(len(articles), per_token.shape[-1]).index_add(0, owner, per_token.sum(1))
            counts = torch.zeros(len(articles)).index_add(0, owner, m.sum(1).float()).clamp_min(1)
            return (sums / counts.unsqueeze(1)).log_softmax(-1)
        out = model(input_ids=ids[flat], attention_mask=mask[flat], output_hidden_states=lm_loss)
    log_probs = pool_windows(out.logits, owner, len(articles), pool)
    if not lm_loss:
        return log_probs
    from pipeline.finetune.article import ArticleClassifier

    # the pipeline's auxiliary next-token loss (``aux_lm_weight``) of the same windows
    with autocast_context(torch.device("cpu"), precision):
        lm = ArticleClassifier(model, 1.0, lm_share).next_token_loss(out.hidden_states[-1], ids[flat], mask[flat])
    return log_probs, lm


def predict(model, split, precision: str, pool: str = "probs") -> list[int]:
    """Every article's predicted class id."""
    import torch

    ids, mask, rows, _ = split
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            preds += article_log_probs(model, ids, mask, rows, list(range(i, min(i + 16, len(rows)))), precision,
                                       pool).argmax(-1).tolist()
    model.train()
    return preds


def macro_f1(model, split, precision: str, pool: str = "probs") -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    preds, y = predict(model, split, precision, pool), split[3]
    return f1_score(y, preds, average="macro"), accuracy_score(y, preds)


def cv_splits(splits_text: dict, folds: int, fold: int) -> dict:
    """``splits_text`` with the training split cut in ``folds`` parts (a fixed shuffle, the same in
    every run): part ``fold`` becomes the ``heldout`` split, the rest the training split. Choosing
    a recipe on the held-out parts of all folds scores it on every training article (1,739 in the
    demo) instead of the 113 of the validation split, and leaves the test split out of the choice."""
    texts, labels = splits_text["train"]
    order = list(range(len(texts)))
    random.Random("cv-folds").shuffle(order)
    held = set(order[fold::folds])
    pick = lambda keep: ([texts[i] for i in range(len(texts)) if keep(i)], [labels[i] for i in range(len(texts)) if keep(i)])
    return {**splits_text, "train": pick(lambda i: i not in held), "heldout": pick(lambda i: i in held)}


class WeightAverages:
    """Two averages of the weights along training, for free in the same run: an exponential
    moving average (``decay`` per step) and the uniform mean over the steps from ``tail_from`` on
    (stochastic weight averaging over the tail of the cosine schedule)."""

    def __init__(self, model, decay: float, tail_from: int):
        self.decay, self.tail_from, self.tail_steps = decay, tail_from, 0
        self.ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.tail = {k: torch_zeros_like(v) for k, v in self.ema.items()}

    def update(self, model, step: int) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
        if step >= self.tail_from:
            self.tail_steps += 1
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    self.tail[k].add_((v.detach().float() - self.tail[k]) / self.tail_steps)
                else:
                    self.tail[k] = v.detach().clone()


def torch_zeros_like(v):
    import torch

    return torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v.detach().clone()


def layer_depth(name: str, layers: int) -> int:
    """0 for the embeddings, i + 1 for block i (``h.i.`` in GPT-2, ``layers.i.`` in Llama), layers + 1
    for what sits above the blocks (the final norm and the classification head)."""
    import re

    m = re.search(r"\.(?:h|layers)\.(\d+)\.", f".{name}")
    if m:
        return int(m.group(1)) + 1
    return 0 if any(k in name for k in ("wte", "wpe", "embed_tokens")) else layers + 1


def discriminative_optimizer(model, lr: float, weight_decay: float, decay: float, embedding_mult: float = 1.0):
    """AdamW with the pipeline's weight-decay groups, each split by depth, the learning rate
    multiplied by ``decay`` per block below the top (layer-wise learning-rate decay, ULMFiT's
    discriminative fine-tuning): the top and the head at ``lr``, the embeddings at
    ``lr * decay ** (layers + 1) * embedding_mult``. Each group carries its multiplier in ``lr_mult``."""
    import torch

    from pipeline.train.optim import param_groups

    layers = model.config.num_hidden_layers
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in param_groups(model, weight_decay):
        by_depth: dict[int, list] = {}
        for p in g["params"]:
            by_depth.setdefault(layer_depth(names[id(p)], layers), []).append(p)
        groups += [{"params": ps, "weight_decay": g["weight_decay"],
                    "lr_mult": decay ** (layers + 1 - d) * (embedding_mult if d == 0 else 1.0)}
                   for d, ps in sorted(by_depth.items())]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def run(args, base: str, splits_text: dict, windows: int, seed: int, pool: str = "probs", fold: int | None = None) -> dict:
    import torch
    import transformers

    from pipeline.finetune.classify_data import Windowing, end_with_eos, ensure_pad_token
    from pipeline.model.build import load_pretrained
    from pipeline.train.loop import set_attention
    from pipeline.train.optim import make_optimizer
    from pipeline.train.schedule import get_lr

    if fold is not None:
        splits_text = cv_splits(splits_text, args.cv, fold)
    tok = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    end_with_eos(tok)
    ensure_pad_token(tok)
    labels = sorted(set(splits_text["train"][1]))
    label2id = {y: i for i, y in enumerate(labels)}
    w = Windowing(args.max_len, windows, args.overlap if windows > 1 else 0)
    splits = {}
    for name, (texts, ys) in splits_text.items():
        ids, mask, rows = encode(tok, texts, w)
        splits[name] = (ids, mask, rows, [label2id[y] for y in ys])
    torch.manual_seed(seed)
    model = load_pretrained(transformers.AutoModelForSequenceClassification, base, num_labels=len(labels),
                            label2id=label2id, id2label={i: y for y, i in label2id.items()})
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    set_attention(model, args.attention)
    model.train()
    if args.layer_decay == 1.0 and args.embedding_lr_mult == 1.0:
        opt = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95))
    else:
        opt = discriminative_optimizer(model, args.lr, args.weight_decay, args.layer_decay, args.embedding_lr_mult)
    averages = WeightAverages(model, args.ema, int(args.steps * (1 - args.tail)))
    ids, mask, rows, y = splits["train"]
    y = torch.tensor(y)
    order, pos, epoch = [], 0, 0
    rng = random.Random(seed)
    best = (-1.0, None, None)
    t0 = time.perf_counter()
    windows_read = 0
    scored = [name for name in ("val", "test", "heldout") if name in splits]
    scores = lambda: {name: macro_f1(model, splits[name], args.precision, pool)[0] for name in scored}
    for step in range(args.steps):
        if pos >= len(order):
            order, pos, epoch = list(range(len(rows))), 0, epoch + 1
            rng.shuffle(order)
        batch = order[pos:pos + args.batch]
        pos += args.batch
        lr = get_lr(step, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps,
                    min_lr=args.lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        if args.aux_lm:
            log_probs, lm = article_log_probs(model, ids, mask, rows, batch, args.precision, pool, lm_loss=True,
                                              lm_share=args.aux_lm_share, sample=args.train_windows)
        else:
            log_probs, lm = article_log_probs(model, ids, mask, rows, batch, args.precision, pool,
                                              sample=args.train_windows), 0.0
        windows_read += sum(min(len(rows[a]), args.train_windows or len(rows[a])) for a in batch)
        loss = torch.nn.functional.nll_loss(log_probs, y[batch]) + args.aux_lm * lm
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        averages.update(model, step)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_f1, val_acc = macro_f1(model, splits["val"], args.precision, pool)
            if val_acc > best[0]:
                best = (val_acc, step + 1, copy.deepcopy(model.state_dict()))
            print(f"  windows {windows} pool {pool} seed {seed} fold {fold} step {step + 1}: loss {loss.item():.3f} "
                  f"val F1 {val_f1:.3f}", flush=True)
    seconds = time.perf_counter() - t0
    out = {"windows": windows, "pool": pool, "seed": seed, "fold": fold, "aux_lm": args.aux_lm, "aux_lm_share": args.aux_lm_share,
           "train_windows": args.train_windows, "min_lr_ratio": args.min_lr_ratio,
           "layer_decay": args.layer_decay, "embedding_lr_mult": args.embedding_lr_mult, "last": scores()}
    for name, state in (("ema", averages.ema), ("tail", averages.tail)):
        model.load_state_dict(state)
        out[name] = scores()
        if name == "tail" and args.predictions and "heldout" in splits:  # the demo's export, for error analysis
            out["tail_heldout_predictions"] = [labels[i] for i in predict(model, splits["heldout"], args.precision, pool)]
    model.load_state_dict(best[2])
    out["best_val"] = {"step": best[1], **scores()}
    return {**out, "seconds": round(seconds, 1), "windows_per_article": round(windows_read / (args.steps * args.batch), 2)}


def tfidf(splits_text: dict, split: str = "test") -> float:
    """The evaluate job's baseline, trained on the training split, scored on ``split``."""
    from sklearn.metrics import f1_score

    from pipeline.evaluate.classify import tfidf_baseline

    preds = tfidf_baseline(*splits_text["train"], splits_text[split][0])
    return f1_score(splits_text[split][1], preds, average="macro")


def errors_vs_tfidf(splits_text: dict, folds: int, runs: list[dict]) -> dict:
    """Where the classifier's held-out errors (``--predictions``) and TF-IDF's fall, over every run:
    articles per cell (classifier right or wrong x TF-IDF right or wrong) with their median length
    in words, and each side's most frequent (true, predicted) confusions."""
    import collections
    import statistics

    from pipeline.evaluate.classify import tfidf_baseline

    cells, confusions = collections.defaultdict(list), {"classifier": collections.Counter(), "tfidf": collections.Counter()}
    baseline = {}
    for r in runs:
        split = cv_splits(splits_text, folds, r["fold"])
        texts, truth = split["heldout"]
        if r["fold"] not in baseline:
            baseline[r["fold"]] = tfidf_baseline(*split["train"], texts)
        for text, y, ours, theirs in zip(texts, truth, r["tail_heldout_predictions"], baseline[r["fold"]]):
            cells[f"classifier {'right' if ours == y else 'wrong'}, TF-IDF {'right' if theirs == y else 'wrong'}"].append(
                len(text.split()))
            for side, pred in (("classifier", ours), ("tfidf", theirs)):
                if pred != y:
                    confusions[side][f"{y} -> {pred}"] += 1
    return {"cells": {k: {"articles": len(v), "median_words": statistics.median(v)} for k, v in sorted(cells.items())},
            "confusions": {k: dict(c.most_common(6)) for k, c in confusions.items()}}


def main() -> None:
    import pyarrow.parquet as pq
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True, help="a prepare output with labeled/{train,val,test}.parquet")
    p.add_argument("--base", required=True, help="the pretrained model directory")
    p.add_argument("--windows", default="1,8", help="windows read per article in training and prediction")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="articles per step (the demo: 2 workers x 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="optim.min_lr_ratio: where the cosine ends (1: a constant rate after the warm-up)")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="learning-rate multiplier per block below the top (layer-wise decay; 1: none)")
    p.add_argument("--embedding-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the token and position embeddings (on top of --layer-decay)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--precision", default="bf16-native")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa", help="train.attention")
    p.add_argument("--pool", default="probs", help="how windows combine: probs (the pipeline's), logits, or both: probs,logits")
    p.add_argument("--ema", type=float, default=0.99, help="decay per step of the weights' moving average")
    p.add_argument("--tail", type=float, default=1 / 3, help="share of the last steps whose weights are averaged")
    p.add_argument("--aux-lm", type=float, default=0.0, help="weight of an auxiliary next-token loss on the same windows")
    p.add_argument("--aux-lm-share", type=float, default=1.0, help="share of the positions the auxiliary loss scores")
    p.add_argument("--train-windows", type=int, default=0,
                   help="K > 0: each training step reads a random K of an article's windows (prediction reads all)")
    p.add_argument("--cv", type=int, default=0, help="K > 1: K-fold cross-validation on the training split")
    p.add_argument("--folds", default="", help="with --cv, the folds to run (default: all)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--predictions", action="store_true",
                   help="with --cv, keep each run's held-out predictions (the weight mean's) in the results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.model.build import quiet_loading

    quiet_loading()
    splits_text = {}
    for name in ("train", "val", "test"):
        t = pq.read_table(Path(args.prepared) / "labeled" / f"{name}.parquet", columns=["text", "label"]).to_pydict()
        splits_text[name] = (t["text"], t["label"])
    results = {"machine": machine(), "args": vars(args), "tfidf_test": tfidf(splits_text), "runs": []}
    print(f"TF-IDF + LogisticRegression, test macro-F1 {results['tfidf_test']:.3f}", flush=True)
    folds = [None] if args.cv < 2 else [int(x) for x in (args.folds or ",".join(map(str, range(args.cv)))).split(",")]
    if args.cv > 1:  # the baseline on the same folds: trained on the rest of the training split
        results["tfidf_cv_heldout"] = {f: tfidf(cv_splits(splits_text, args.cv, f), "heldout") for f in folds}
        print(f"TF-IDF + LogisticRegression, held-out macro-F1 per fold {results['tfidf_cv_heldout']}", flush=True)
    for windows in [int(x) for x in args.windows.split(",")]:
        for pool in args.pool.split(","):
            for seed in [int(x) for x in args.seeds.split(",")]:
                for fold in folds:
                    r = run(args, args.base, splits_text, windows, seed, pool, fold)
                    results["runs"].append(r)
                    print(json.dumps(r), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.predictions and args.cv > 1:
        results["errors_vs_tfidf"] = errors_vs_tfidf(splits_text, args.cv, results["runs"])
        print(json.dumps(results["errors_vs_tfidf"], indent=1), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
