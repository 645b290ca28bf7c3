"""MinHash signatures, LSH banding, exact Jaccard and union-find: the pure core of fuzzy dedup.

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' shingle sets by the
fraction of equal per-permutation minima. LSH banding (Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3.4) splits a signature into ``bands`` bands of ``rows`` rows; two documents
become a candidate pair when any band matches, which happens with probability
``1 - (1 - J**rows)**bands`` (an S-curve with threshold about ``(1/bands)**(1/rows)``).

Shingles are word n-grams of the lower-cased text. Each word is hashed once with CRC-32 (C speed,
stable across processes unlike ``hash()``) and n-gram hashes are combined with numpy. The
permutations are multiply-shift hashes ``h(x) = ((a*x + b) mod 2**64) >> 32`` with random 64-bit
``a, b``, a strongly universal family for 32-bit keys (Dietzfelbinger 1996, "Universal hashing and
k-wise independent random variables via integer arithmetic without primes"): one multiply, add and
shift per (shingle, permutation), where datasketch pays a SHA-1 per shingle and a 64-bit modulo.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.config import check, check_seed

MAX_HASH = np.uint64((1 << 32) - 1)
_WORD = re.compile(r"\w+")
_CHUNK = 4096  # shingles per block of the (shingles x permutations) matrix: bounds memory on huge docs


@dataclass(frozen=True, kw_only=True)
class MinHashConfig:
    enabled: bool = True
    shingle_size: int = 5  # words per shingle
    num_perm: int = 120
    bands: int = 20
    rows: int = 6  # bands x rows <= num_perm; threshold ~ (1/20)**(1/6) = 0.61
    seed: int = 42
    verify: bool = True  # check candidate pairs with the exact Jaccard of their shingle sets
    jaccard_threshold: float = 0.8  # a verified pair is a duplicate at or above this
    num_partitions: int | None = None  # shuffle partitions; default 2 x cluster CPUs

    def __post_init__(self) -> None:
        check(self.shingle_size >= 1, f"dedup.fuzzy.shingle_size must be >= 1, got {self.shingle_size}")
        check(self.num_perm >= 1, f"dedup.fuzzy.num_perm must be >= 1, got {self.num_perm}")
        check(self.bands >= 1 and self.rows >= 1, f"dedup.fuzzy.bands and rows must be >= 1, got {self.bands}, {self.rows}")
        check(
            self.bands * self.rows <= self.num_perm,
            f"dedup.fuzzy.bands x rows must be <= num_perm, got {self.bands} x {self.rows} > {self.num_perm}",
        )
        check(0.0 < self.jaccard_threshold <= 1.0,
              f"dedup.fuzzy.jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}")
        check_seed(self.seed, "dedup.fuzzy.seed")
        check(self.num_partitions is None or self.num_partitions >= 1,
              f"dedup.fuzzy.num_partitions must be >= 1 or null, got {self.num_partitions}")

    @property
    def lsh_threshold(self) -> float:
        return (1.0 / self.bands) ** (1.0 / self.rows)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - jaccard**rows) ** bands


def word_hashes(text: str, cache: dict[str, int] | None = None) -> np.ndarray:
    words = _WORD.findall(text.lower())
    if cache is None:
        cache = {}
    # hash each distinct new word once; the lookups below run in C (map over a dict method)
    for w in set(words).difference(cache):
        cache[w] = zlib.crc32(w.encode())
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def shingle_hashes(text: str, k: int, cache: dict[str, int] | None = None, unique: bool = True) -> np.ndarray:
    """32-bit hashes of the word k-grams (the whole text when shorter than k words), sorted and
    unique unless ``unique=False`` (MinHash does not need it: repeats do not change a minimum)."""
    w = word_hashes(text, cache)
    if len(w) == 0:
        return np.empty(0, dtype=np.uint64)
    k = min(k, len(w))
    n = len(w) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point of a polynomial hash
        for j in range(k):
            h *= np.uint64(1_000_003)
            h += w[j : j + n]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    h &= MAX_HASH
    return np.unique(h) if unique else h


class MinHasher:
    def __init__(self, num_perm: int, seed: int = 42):
        rng = np.random.RandomState(seed)
        self.a = rng.randint(0, 1 << 63, size=num_perm, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.randint(0, 1 << 63, size=num_perm, dtype=np.int64).astype(np.uint64)
        self.num_perm = num_perm

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """32-bit MinHash signature of a set of 32-bit shingle hashes (all-ones for the empty set)."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the hash
            for start in range(0, len(shingles), _CHUNK):
                x = shingles[start : start + _CHUNK, None]
                phv = x * self.a
                phv += self.b
                np.minimum(sig, phv.min(axis=0), out=sig)
        # ">> 32" is monotone, so it commutes with the minimum: shift once per permutation
        return (sig >> np.uint64(32)).astype(np.uint32)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 63-bit key per band; the band index is hashed in so that bands never collide."""
    sig = np.ascontiguousarray(signature[: bands * rows], dtype=np.uint32).reshape(bands, rows)
    return [
        int.from_bytes(hashlib.blake2b(bytes([b % 256, b // 256]) + sig[b].tobytes(), digest_size=8).digest(), "little")
        >> 1
        for b in range(bands)
    ]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class UnionFind:
    """Union-find with path halving; the root of each set is its smallest element, so that the
    representative of a duplicate cluster is deterministic (the smallest doc id)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def components(self) -> dict[str, str]:
        return {x: self.find(x) for x in list(self.parent)}
