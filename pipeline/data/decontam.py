"""Decontamination: drop training documents that share a word n-gram (13 by default, as in
GPT-3, Brown et al. 2020, Appendix C) with an evaluation set.

``NgramIndex.from_texts(eval_texts, n)`` builds a sorted array of n-gram hashes (stored as .npy
by the prepare stage); ``index.contaminated(text)`` tells whether a document overlaps."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import check
from pipeline.data.minhash import shingle_hashes


@dataclass(frozen=True, kw_only=True)
class DecontamConfig:
    enabled: bool = False
    eval_paths: list[str] = field(default_factory=list)  # files/globs/URIs in any source format
    text_field: str = "text"
    ngram: int = 13

    def __post_init__(self) -> None:
        check(self.ngram >= 1, f"decontam.ngram must be >= 1, got {self.ngram}")
        check(not self.enabled or bool(self.eval_paths), "decontam.enabled needs decontam.eval_paths")


class NgramIndex:
    def __init__(self, hashes: np.ndarray, n: int):
        self.hashes = np.unique(hashes.astype(np.uint64))
        self.n = n

    @classmethod
    def from_texts(cls, texts, n: int) -> "NgramIndex":
        parts = [_ngrams(t, n) for t in texts]
        return cls(np.concatenate(parts) if parts else np.empty(0, np.uint64), n)

    def contaminated(self, text: str) -> bool:
        if len(self.hashes) == 0:
            return False
        grams = _ngrams(text, self.n)
        return bool(len(grams)) and bool(np.isin(grams, self.hashes, assume_unique=True).any())


def _ngrams(text: str, n: int) -> np.ndarray:
    grams = shingle_hashes(text, n)
    # texts shorter than n words give one shingle of the whole text; they cannot hold an n-gram
    return grams if len(text.split()) >= n else np.empty(0, np.uint64)
