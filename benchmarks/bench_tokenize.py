"""Benchmark (a): tokenize + pack + write Parquet vs raw ``tokenizers`` ``encode_batch`` on the same
documents and threads.

    .venv/bin/python benchmarks/bench_tokenize.py [--repeats 5] [--copies 4]

Both sides run in this process with the same Rust thread pool (RAYON_NUM_THREADS, default all
cores); ours is ``pipeline.data.shards.write_packed_shard`` on groups of 2,000 documents, the
production code path that each Ray Data task runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import demo_texts, machine, median_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=4, help="repeat the corpus to get a longer run")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from pipeline.data.shards import write_packed_shard
    from pipeline.data.tokenizer import TokenizerConfig, load_backend, train_tokenizer

    docs = demo_texts() * args.copies
    texts = [d["text"] for d in docs]
    ids = [f"d{i}" for i in range(len(texts))]
    sources = [d["source"] for d in docs]
    work = Path(tempfile.mkdtemp(prefix="bench_tok"))
    train_tokenizer(iter(texts[: len(texts) // args.copies]), TokenizerConfig(vocab_size=8192), work / "tok")
    tok, _ = load_backend(str(work / "tok"))
    num_bytes = sum(len(t.encode()) for t in texts)

    def raw():
        tok.encode_batch(texts, add_special_tokens=False)

    def raw_fast():
        tok.encode_batch_fast(texts, add_special_tokens=False)

    def ours():
        out = work / "shards"
        out.mkdir(exist_ok=True)
        for start in range(0, len(texts), 2000):
            write_packed_shard(ids[start:start + 2000], texts[start:start + 2000], sources[start:start + 2000],
                               str(work / "tok"), args.seq_len, str(out))

    raw(), ours()  # warm-up
    t_raw, t_fast, t_ours = (median_time(f, args.repeats) for f in (raw, raw_fast, ours))
    mb = num_bytes / 1e6
    print(f"machine: {machine()}; {len(texts)} documents, {mb:.1f} MB; median of {args.repeats}")
    print(f"raw encode_batch:            {t_raw:.3f} s  {mb / t_raw:.2f} MB/s")
    print(f"raw encode_batch_fast:       {t_fast:.3f} s  {mb / t_fast:.2f} MB/s")
    print(f"ours tokenize+pack+write:    {t_ours:.3f} s  {mb / t_ours:.2f} MB/s")
    print(f"ratio vs encode_batch:       {t_raw / t_ours:.2f}x (goal >= 0.85x)")
    print(f"ratio vs encode_batch_fast:  {t_fast / t_ours:.2f}x")


if __name__ == "__main__":
    main()
