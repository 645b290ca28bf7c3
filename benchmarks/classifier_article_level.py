"""Does a classifier trained on whole articles close the gap to TF-IDF?

The pipeline's classifier reads each article's first ``max_len`` tokens, or with ``data.windows``
up to W windows, each trained on as a separate example with the article's label. This study
trains article-level instead (multiple-instance learning): a step takes B articles, runs every
window of each (up to ``--windows``), and the loss is the negative log of the mean of an article's
window probabilities, the prediction the evaluate job and Serve make from windows. So the model
learns from the whole article at once, as TF-IDF reads it. ``--windows 1`` is the pipeline's own
recipe (one window, plain cross-entropy) through the same code: the baseline of the same run.

    python benchmarks/classifier_article_level.py --prepared outputs/prepare/<run> \
        --base outputs/pretrain/<run>/model [--windows 1,8] [--seeds 0,1,2] [--steps 300] [--json out.json]

No Ray: one process, the pipeline's optimizer, schedule, precision and data encoding. Reports
val and test macro-F1 at the last step and at the step with the best val accuracy (the
pipeline's export rule), with TF-IDF + LogisticRegression on the same split.
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


def article_probs(model, ids, mask, rows: list[list[int]], articles: list[int], precision: str):
    """(len(articles), classes): each article's mean window probability."""
    import torch

    from pipeline.train.loop import autocast_context

    flat = [j for a in articles for j in rows[a]]
    owner = torch.tensor([k for k, a in enumerate(articles) for _ in rows[a]])
    with autocast_context(torch.device("cpu"), precision):
        logits = model(input_ids=ids[flat], attention_mask=mask[flat]).logits.float()
    probs = torch.zeros(len(articles), logits.shape[1]).index_add_(0, owner, logits.softmax(-1))
    return probs / torch.bincount(owner, minlength=len(articles)).unsqueeze(1)


def macro_f1(model, split, precision: str) -> tuple[float, float]:
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    ids, mask, rows, y = split
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            preds += article_probs(model, ids, mask, rows, list(range(i, min(i + 16, len(rows)))), precision
                                   ).argmax(-1).tolist()
    model.train()
    return f1_score(y, preds, average="macro"), accuracy_score(y, preds)


def run(args, base: str, splits_text: dict, windows: int, seed: int) -> dict:
    import torch
    import transformers

    from pipeline.finetune.classify_data import Windowing, end_with_eos, ensure_pad_token
    from pipeline.model.build import load_pretrained
    from pipeline.train.optim import make_optimizer
    from pipeline.train.schedule import get_lr

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
    model.train()
    opt = make_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95))
    ids, mask, rows, y = splits["train"]
    y = torch.tensor(y)
    order, pos, epoch = [], 0, 0
    rng = random.Random(seed)
    best = (-1.0, None, None)
    t0 = time.perf_counter()
    windows_read = 0
    for step in range(args.steps):
        if pos >= len(order):
            order, pos, epoch = list(range(len(rows))), 0, epoch + 1
            rng.shuffle(order)
        batch = order[pos:pos + args.batch]
        pos += args.batch
        lr = get_lr(step, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps, min_lr=args.lr * 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        probs = article_probs(model, ids, mask, rows, batch, args.precision)
        windows_read += sum(len(rows[a]) for a in batch)
        loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_f1, val_acc = macro_f1(model, splits["val"], args.precision)
            if val_acc > best[0]:
                best = (val_acc, step + 1, copy.deepcopy(model.state_dict()))
            print(f"  windows {windows} seed {seed} step {step + 1}: loss {loss.item():.3f} val F1 {val_f1:.3f}",
                  flush=True)
    seconds = time.perf_counter() - t0
    last = {"val": macro_f1(model, splits["val"], args.precision)[0], "test": macro_f1(model, splits["test"], args.precision)[0]}
    model.load_state_dict(best[2])
    at_best = {"step": best[1], "val": macro_f1(model, splits["val"], args.precision)[0],
               "test": macro_f1(model, splits["test"], args.precision)[0]}
    return {"windows": windows, "seed": seed, "last": last, "best_val": at_best, "seconds": round(seconds, 1),
            "windows_per_article": round(windows_read / (args.steps * args.batch), 2)}


def tfidf(splits_text: dict) -> float:
    """The evaluate job's baseline on the same split."""
    from sklearn.metrics import f1_score

    from pipeline.evaluate.classify import tfidf_baseline

    preds = tfidf_baseline(*splits_text["train"], splits_text["test"][0])
    return f1_score(splits_text["test"][1], preds, average="macro")


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
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--precision", default="bf16-native")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
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
    for windows in [int(x) for x in args.windows.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            r = run(args, args.base, splits_text, windows, seed)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
