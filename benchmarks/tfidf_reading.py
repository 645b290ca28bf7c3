"""How much of the TF-IDF baseline's lead is the length of text read? The evaluate job's TF-IDF +
LogisticRegression baseline, trained and tested on the first N tokens of every article (N as the
classifier's window; the prepare output's tokenizer), on the labeled BBC train / test splits.

    python benchmarks/tfidf_reading.py --prepared outputs/prepare/<run> [--tokens 64,128,256,512,0]

0 = the whole text. No model, no Ray; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepared", required=True, help="a prepare output directory (with labeled/ and tokenizer/)")
    parser.add_argument("--tokens", default="64,128,256,512,0")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipeline.evaluate.classify import classification_metrics, read_spans, tfidf_baseline
    from pipeline.finetune.classify_data import Windowing

    prep = Path(args.prepared)
    train = pq.read_table(prep / "labeled" / "train.parquet").to_pylist()
    test = pq.read_table(prep / "labeled" / "test.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(str(prep / "tokenizer"))
    labels = sorted({r["label"] for r in train})
    print(f"{machine()}\n{len(train)} train / {len(test)} test texts\n\n| tokens read | TF-IDF macro-F1 | accuracy |\n|---:|---:|---:|")
    for n in (int(x) for x in args.tokens.split(",")):
        if n:
            w = Windowing(n)
            x_train, x_test = read_spans(tok, [r["text"] for r in train], w), read_spans(tok, [r["text"] for r in test], w)
        else:
            x_train, x_test = [r["text"] for r in train], [r["text"] for r in test]
        preds = tfidf_baseline(x_train, [r["label"] for r in train], x_test)
        m = classification_metrics([r["label"] for r in test], preds, labels)
        print(f"| {n or 'all'} | {m['f1_macro']:.3f} | {m['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
