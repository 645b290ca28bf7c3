"""Why does the demo's BBC classifier trail TF-IDF? A study without Ray (GPU or CPU).

    python benchmarks/classifier_study.py --prepared outputs/prepare/<run> \
        [--base outputs/pretrain/<run>/model] [--pretrain-steps 200,800,3200] \
        [--recipes 1e-3:300:128,1e-3:600:128] [--pooling last,mean] [--seeds 0,1,2] \
        [--workers 4] [--json out.json]

Two questions, answered on the prepare output's labeled BBC splits (train / val / test):
1. Is the gap the encoder? The demo's small GPT-2 is pretrained from scratch on the prepare
   output's train shards for each ``--pretrain-steps`` budget (the demo's recipe otherwise:
   global batch 16 x 256 tokens, AdamW lr 1e-3, warmup 20, weight decay 0.1, cosine; the demo
   trains 200 steps), and ``--base`` adds an existing model directory (the demo's own).
2. Is it the fine-tuning recipe? Each base is fine-tuned as a classifier with each recipe
   ``lr:steps:max_tokens`` (batch 16, warmup 20, weight decay 0.01, the demo's settings otherwise:
   texts end with EOS, the checkpoint with the best validation accuracy is kept, checked every
   50 steps) and pooling: ``last`` is ``GPT2ForSequenceClassification`` (the last token's state,
   what the pipeline trains and serves), ``mean`` a linear head on the mean of the final hidden
   states over the text's tokens (not an HF class; here to measure what pooling is worth).

Every run reports validation and test macro-F1 and accuracy at the best-validation checkpoint
and at the end, next to the TF-IDF + LogisticRegression baseline on the same split. Runs use the
same ``Trainer`` (pipeline/train/loop.py) as the Ray Train workers, in fp32, one process per run,
``--workers`` runs at a time. Ray is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EVAL_EVERY = 50
BATCH = 16


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrain(prepared: str, steps: int, out_dir: str, seed: int = 0, preset: str = "small",
             precision: str = "fp32", lr: float = 1e-3) -> dict:
    """A GPT-2 of ``preset`` size (the demo's small one by default) trained with the demo's recipe
    for ``steps`` steps of 16 x 256 tokens; saved to out_dir."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from pipeline.model.build import ModelConfig, build_model
    from pipeline.train.data import LMBatcher, load_manifest, shard_paths
    from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer

    torch.backends.cuda.matmul.allow_tf32 = False
    device = _device()
    manifest = load_manifest(prepared)
    tok = AutoTokenizer.from_pretrained(str(Path(prepared) / "tokenizer"), local_files_only=True)

    def rows(split):
        return torch.tensor([r for f in shard_paths(prepared, manifest, split)
                             for r in pq.read_table(f, columns=["input_ids"]).column(0).to_pylist()])

    train, val = rows("train"), rows("val")
    model = build_model(ModelConfig(arch="gpt2", preset=preset, max_seq_len=256), len(tok), tok.pad_token_id,
                        tok.eos_token_id, seed=seed).to(device)
    batcher = LMBatcher("causal")

    def batches(epoch):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            yield batcher(train[order[i:i + BATCH]])

    def val_batches():
        for i in range(0, len(val), BATCH):
            yield batcher(val[i:i + BATCH])

    loop = LoopConfig(max_steps=steps, batch_size=BATCH, eval_every=steps, eval_batches=0, log_every=max(1, steps // 4),
                      precision=precision, seed=seed)
    trainer = Trainer(model, OptimConfig(lr=lr, warmup_steps=20, weight_decay=0.1), loop, device)
    evals: list[dict] = []
    t0 = time.perf_counter()
    trainer.fit(TrainState(), batches, val_batches, on_eval=lambda m, s, last: evals.append(m))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"steps": steps, "tokens": steps * BATCH * 256, "val_loss": evals[-1]["val_loss"],
            "val_ppl": evals[-1]["val_ppl"], "seconds": time.perf_counter() - t0}


class MeanPooled:
    """A linear head on the masked mean of a causal LM's final hidden states (study only)."""

    @staticmethod
    def build(base: str, num_labels: int):
        import torch
        from transformers import AutoModel

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = AutoModel.from_pretrained(base, local_files_only=True)
                self.score = torch.nn.Linear(self.body.config.hidden_size, num_labels)

            def forward(self, input_ids, attention_mask, labels=None):
                h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                logits = self.score((h * m).sum(1) / m.sum(1).clamp(min=1))
                loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
                from types import SimpleNamespace

                return SimpleNamespace(loss=loss, logits=logits)

        return Model()


def finetune(job: dict) -> dict:
    """One classifier run: ``job`` = base, prepared, lr, steps, max_len, pooling, seed."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.finetune.classify_data import encode_classification, end_with_eos, read_labeled
    from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer

    torch.backends.cuda.matmul.allow_tf32 = False
    device = _device()
    tok = AutoTokenizer.from_pretrained(job["base"], local_files_only=True)
    end_with_eos(tok)
    labeled = Path(job["prepared"]) / "labeled"
    data = {s: read_labeled(str(labeled / f"{s}.parquet"), "text", "label", []) for s in ("train", "val", "test")}
    labels = sorted({y for _, y in data["train"]})
    label2id = {y: i for i, y in enumerate(labels)}

    def tensors(split):
        rows = encode_classification([t for t, _ in data[split]], [y for _, y in data[split]], label2id, tok,
                                     job["max_len"])
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}

    enc = {s: tensors(s) for s in data}
    torch.manual_seed(job["seed"])
    if job["pooling"] == "mean":
        model = MeanPooled.build(job["base"], len(labels))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            job["base"], num_labels=len(labels), pad_token_id=tok.pad_token_id, local_files_only=True)
    model.to(device)
    n = len(enc["train"]["labels"])

    def batches(epoch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(job["seed"] * 1000 + epoch))
        for i in range(0, n - BATCH + 1, BATCH):
            yield {k: v[order[i:i + BATCH]] for k, v in enc["train"].items()}

    @torch.no_grad()
    def scores(split):
        model.eval()
        e = enc[split]
        pred = []
        for i in range(0, len(e["labels"]), 64):
            out = model(input_ids=e["input_ids"][i:i + 64].to(device), attention_mask=e["attention_mask"][i:i + 64].to(device))
            pred += out.logits.argmax(-1).tolist()
        model.train()
        y = e["labels"].tolist()
        return {"f1": f1_score(y, pred, average="macro"), "acc": accuracy_score(y, pred)}

    evals: list[dict] = []

    def on_eval(metrics, state, last):
        evals.append({"step": state.step, "val": scores("val"), "test": scores("test")})

    loop = LoopConfig(max_steps=job["steps"], batch_size=BATCH, eval_every=EVAL_EVERY, log_every=EVAL_EVERY,
                      precision="fp32", seed=job["seed"])
    trainer = Trainer(model, OptimConfig(lr=job["lr"], warmup_steps=20, weight_decay=0.01), loop, device)
    t0 = time.perf_counter()
    trainer.fit(TrainState(), batches, None, on_eval=on_eval)
    best = max(evals, key=lambda e: (e["val"]["acc"], e["step"]))  # ties: the later checkpoint
    return {**{k: v for k, v in job.items() if k != "prepared"}, "best_step": best["step"],
            "val_f1": best["val"]["f1"], "test_f1": best["test"]["f1"], "test_acc": best["test"]["acc"],
            "final_val_f1": evals[-1]["val"]["f1"], "final_test_f1": evals[-1]["test"]["f1"],
            "seconds": time.perf_counter() - t0}


def tfidf(prepared: str) -> dict:
    from sklearn.metrics import f1_score

    from pipeline.evaluate.classify import tfidf_baseline
    from pipeline.finetune.classify_data import read_labeled

    labeled = Path(prepared) / "labeled"
    tr = read_labeled(str(labeled / "train.parquet"), "text", "label", [])
    out = {}
    for split in ("val", "test"):
        te = read_labeled(str(labeled / f"{split}.parquet"), "text", "label", [])
        pred = tfidf_baseline([t for t, _ in tr], [y for _, y in tr], [t for t, _ in te])
        out[f"{split}_f1"] = f1_score([y for _, y in te], pred, average="macro")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", required=True, help="a prepare output directory (shards, tokenizer, labeled/)")
    ap.add_argument("--base", default=None, help="also fine-tune from this model directory")
    ap.add_argument("--pretrain-steps", default="200,800,3200")
    ap.add_argument("--recipes", default="1e-3:300:128,1e-3:600:128,1e-3:600:256,5e-4:600:256")
    ap.add_argument("--pooling", default="last,mean")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1, help="fine-tuning runs at a time (processes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import multiprocessing as mp

    import torch

    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "tfidf": tfidf(args.prepared), "bases": {}, "runs": []}
    print("tfidf", out["tfidf"], flush=True)
    tmp = tempfile.mkdtemp(prefix="clsstudy-")
    bases = {}
    if args.base:
        bases["given"] = args.base
    for steps in [int(s) for s in args.pretrain_steps.split(",") if s]:
        path = f"{tmp}/pre{steps}"
        out["bases"][f"pre{steps}"] = pretrain(args.prepared, steps, path)
        print(f"pre{steps}", out["bases"][f"pre{steps}"], flush=True)
        bases[f"pre{steps}"] = path
    jobs = [{"base_name": name, "base": path, "prepared": args.prepared, "lr": float(lr), "steps": int(st),
             "max_len": int(ml), "pooling": pool, "seed": int(seed)}
            for seed in args.seeds.split(",") for name, path in bases.items()
            for r in args.recipes.split(",") for lr, st, ml in [r.split(":")] for pool in args.pooling.split(",")]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for res in pool.imap(finetune, jobs):
            out["runs"].append(res)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "base"}), flush=True)
            if args.json:  # after every run: a study cut short keeps what it measured
                Path(args.json).write_text(json.dumps(out, indent=1))
    groups: dict = {}
    for r in out["runs"]:
        groups.setdefault((r["base_name"], r["lr"], r["steps"], r["max_len"], r["pooling"]), []).append(r)
    print("\nbase | lr | steps | tokens | pooling | val F1 (median) | test F1 (median, min-max) | final test F1")
    for key, rs in groups.items():
        tf = [r["test_f1"] for r in rs]
        print(" | ".join(map(str, key)), f"| {statistics.median(r['val_f1'] for r in rs):.3f}",
              f"| {statistics.median(tf):.3f} ({min(tf):.3f}-{max(tf):.3f})",
              f"| {statistics.median(r['final_test_f1'] for r in rs):.3f}")


if __name__ == "__main__":
    main()
