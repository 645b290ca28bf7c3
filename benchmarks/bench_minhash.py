"""Benchmark (b): MinHash signature throughput vs ``datasketch`` with the same number of
permutations and the same 5-word shingles; and duplicate-pair recall / precision of our LSH
(default bands x rows) against exact Jaccard on planted near-duplicates.

    .venv/bin/python benchmarks/bench_minhash.py [--docs 2000] [--num-perm 128] [--repeats 3]

Baseline: ``datasketch.MinHash(num_perm).update_batch(shingles)`` (its fastest API: one SHA-1 per
shingle, vectorised permutations). Ours: ``shingle_hashes`` + ``MinHasher.signature`` (CRC-32 per
word, numpy n-gram combination, same permutation family).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import demo_texts, machine, median_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--planted", type=int, default=300)
    args = parser.parse_args()

    from datasketch import MinHash

    from pipeline.data.dedup import bucket_edges
    from pipeline.data.minhash import _WORD, MinHashConfig, MinHasher, band_keys, jaccard, shingle_hashes

    texts = [d["text"] for d in demo_texts() if d["source"] == "bbc-news"][: args.docs]
    k = 5

    def ours():
        hasher = MinHasher(args.num_perm, 1)
        cache: dict[str, int] = {}
        return [hasher.signature(shingle_hashes(t, k, cache, unique=False)) for t in texts]

    def baseline():
        out = []
        for t in texts:
            words = _WORD.findall(t.lower())
            shingles = {" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))}
            m = MinHash(num_perm=args.num_perm, seed=1)
            m.update_batch(list(shingles))
            out.append(m.hashvalues)
        return out

    ours(), baseline()
    t_ours, t_base = median_time(ours, args.repeats), median_time(baseline, args.repeats)
    print(f"machine: {machine()}; {len(texts)} BBC documents, num_perm={args.num_perm}, median of {args.repeats}")
    print(f"datasketch update_batch: {t_base:.3f} s  {len(texts) / t_base:.0f} docs/s")
    print(f"ours:                    {t_ours:.3f} s  {len(texts) / t_ours:.0f} docs/s")
    print(f"speed-up: {t_base / t_ours:.2f}x (goal >= 2x)")

    # Planted near-duplicates: copies of random documents with a fraction of words replaced.
    rng = random.Random(0)
    cfg = MinHashConfig()
    base = texts[:1000]
    vocab = sorted({w for t in base for w in t.split()})
    corpus = list(base)
    for _ in range(args.planted):
        words = rng.choice(base).split()
        for i in rng.sample(range(len(words)), int(rng.uniform(0.0, 0.12) * len(words))):
            words[i] = rng.choice(vocab)
        corpus.append(" ".join(words))
    sets = [shingle_hashes(t, cfg.shingle_size) for t in corpus]
    truth = set()
    lengths = np.array([len(s) for s in sets])
    for i in range(len(corpus)):
        for j in range(i + 1, len(corpus)):
            # Jaccard <= min/max size ratio: skip pairs that cannot reach the threshold
            if min(lengths[i], lengths[j]) < cfg.jaccard_threshold * max(lengths[i], lengths[j]):
                continue
            if jaccard(sets[i], sets[j]) >= cfg.jaccard_threshold:
                truth.add((i, j))
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    keys, ids = [], []
    for i, s in enumerate(sets):
        for key in band_keys(hasher.signature(s), cfg.bands, cfg.rows):
            keys.append(key)
            ids.append(f"{i:06d}")
    a, b = bucket_edges(np.array(keys, dtype=np.int64), np.array(ids, dtype=object))
    # candidate pairs implied by buckets: all pairs inside each connected bucket star
    from collections import defaultdict

    groups = defaultdict(set)
    for x, y in zip(a, b):
        groups[x].add(y)
    cand = set()
    for x, ys in groups.items():
        members = sorted({x, *ys})
        cand.update((int(p), int(q)) for idx, p in enumerate(members) for q in members[idx + 1:])
    verified = {(i, j) for i, j in cand if jaccard(sets[i], sets[j]) >= cfg.jaccard_threshold}
    recall = len(cand & truth) / max(1, len(truth))
    print(f"planted: {len(corpus)} docs ({args.planted} perturbed copies); {len(truth)} pairs with exact "
          f"Jaccard >= {cfg.jaccard_threshold} (bands={cfg.bands}, rows={cfg.rows}, num_perm={cfg.num_perm})")
    print(f"LSH candidate recall: {recall:.4f} (goal >= 0.95); candidate precision: {len(cand & truth) / max(1, len(cand)):.4f}")
    print(f"after Jaccard verification: recall {len(verified & truth) / max(1, len(truth)):.4f}, "
          f"precision {len(verified & truth) / max(1, len(verified)):.4f}")


if __name__ == "__main__":
    main()
