"""Does a trained classifier gain from reading more of each article than it was trained on?

The classifier (e.g. the demo's, trained on each article's first 128 tokens) predicts every
labeled val / test text with 1, 2, 4, ... windows of the same length: its prediction is the mean
of the windows' probabilities, as the evaluate job and Serve compute it for a classifier trained
with ``data.windows``. Also a linear probe: logistic regression on the pretrained base's frozen
hidden states, averaged over the same windows (``--base``), to tell how much of the fine-tuned
figure the pretrained representations alone carry.

    python benchmarks/classifier_reading.py --prepared outputs/prepare/<run> \
        --model outputs/finetune/<classify run>/model [--base outputs/pretrain/<run>/model] \
        [--windows 1,2,4,8,16,64] [--overlap 32]

No Ray; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402


def linear_probe(base: str, splits: dict, w, train_texts: list[str], train_labels: list[str]) -> dict:
    """Macro-F1 per split of a logistic regression on the base's mean-pooled final and middle
    hidden states, averaged over each text's windows ``w``."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoTokenizer

    from pipeline.finetune.classify_data import encode_windows

    tok, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    @torch.no_grad()
    def features(texts: list[str]) -> np.ndarray:
        enc, source = encode_windows(tok, texts, w, padding=True, return_tensors="pt")
        pooled = []
        for i in range(0, len(source), 64):
            mask = enc["attention_mask"][i:i + 64]
            hidden = model(input_ids=enc["input_ids"][i:i + 64], attention_mask=mask, output_hidden_states=True).hidden_states
            h = torch.cat([hidden[-1], hidden[len(hidden) // 2]], -1)
            pooled.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        summed, counts = np.zeros((len(texts), pooled[0].shape[1])), np.zeros(len(texts))
        np.add.at(summed, source, torch.cat(pooled).numpy())
        np.add.at(counts, source, 1)
        return summed / counts[:, None]

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(features(train_texts), train_labels)
    return {s: f1_score(y, clf.predict(features(t)), average="macro") for s, (t, y) in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepared", required=True, help="a prepare output directory (with labeled/)")
    parser.add_argument("--model", required=True, help="a fine-tuned sequence-classification directory")
    parser.add_argument("--base", help="its pretrained base, for the frozen linear probe")
    parser.add_argument("--windows", default="1,2,4,8,16,64")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--splits", default="val,test")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.evaluate.classify import classification_metrics, predict_labels, reading
    from pipeline.finetune.classify_data import label_name

    torch.set_num_threads(2)
    labeled = Path(args.prepared) / "labeled"

    def load(split: str) -> tuple[list[str], list[str]]:
        rows = pq.read_table(labeled / f"{split}.parquet").to_pylist()
        return [r["text"] for r in rows], [label_name(r["label"]) for r in rows]

    splits = {s: load(s) for s in args.splits.split(",")}
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    trained = reading(model)
    print(f"{machine()}\nclassifier {args.model}: trained on {trained.windows} window(s) of {trained.max_len} tokens\n")
    print("| windows read | " + " | ".join(f"{s} macro-F1 ({len(splits[s][0])})" for s in splits) + " |")
    print("|---:|" + "---:|" * len(splits))
    for n in (int(x) for x in args.windows.split(",")):
        w = replace(trained, windows=n, overlap=trained.overlap if n == 1 else args.overlap)
        w.save_to(model.config)  # the reading predict_labels applies
        scores = [classification_metrics(y, predict_labels(model, tok, t), sorted(set(y)))["f1_macro"]
                  for t, y in splits.values()]
        print(f"| {n} | " + " | ".join(f"{f:.3f}" for f in scores) + " |", flush=True)
    if args.base:
        w = replace(trained, windows=max(int(x) for x in args.windows.split(",")), overlap=0)
        probe = linear_probe(args.base, splits, w, *load("train"))
        print(f"\nlinear probe on the frozen base ({args.base}), {w.windows} windows of {w.max_len} tokens: " +
              ", ".join(f"{s} {f:.3f}" for s, f in probe.items()))


if __name__ == "__main__":
    main()
