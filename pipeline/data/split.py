"""Deterministic train/val/test assignment by a hash of the document id: the same document lands
in the same split on every run and every machine, whatever the order of processing. For labeled
documents, ``coverage_moves`` then gives a class the hash left out of val or test one document
there (also independent of the order)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from pipeline.config import check


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    val_fraction: float = 0.05
    test_fraction: float = 0.10  # labeled sources only: unlabeled text has no use for a test split here
    seed: str = "split-v1"

    def __post_init__(self) -> None:
        check(0 <= self.val_fraction < 1, f"split.val_fraction must be in [0, 1), got {self.val_fraction}")
        check(0 <= self.test_fraction < 1, f"split.test_fraction must be in [0, 1), got {self.test_fraction}")
        check(self.val_fraction + self.test_fraction < 1,
              f"split.val_fraction + split.test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")


def _unit(doc_id: str, cfg: SplitConfig) -> float:
    """The document's place in [0, 1): the hash the split is read from."""
    digest = hashlib.sha256(f"{cfg.seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for(doc_id: str, labeled: bool, cfg: SplitConfig) -> str:
    u = _unit(doc_id, cfg)
    if u < cfg.val_fraction:
        return "val"
    if labeled and u < cfg.val_fraction + cfg.test_fraction:
        return "test"
    return "train"


@lru_cache(maxsize=64)
def without(cfg: SplitConfig, held_out: tuple[str, ...]) -> SplitConfig:
    """``cfg`` with the fractions of the ``held_out`` splits (val, test) set to 0: a source that
    names those splits itself keeps all its other records out of them."""
    return dataclasses.replace(cfg, val_fraction=0.0 if "val" in held_out else cfg.val_fraction,
                               test_fraction=0.0 if "test" in held_out else cfg.test_fraction)


def _short(size: int, present: bool, fraction: float) -> bool:
    """Whether a class of ``size`` documents, none of them in a held-out split when not ``present``,
    is owed one there."""
    return not present and fraction > 0 and size * fraction >= 0.5


def uncovered(counts: dict[str, dict[str, int]], cfg: SplitConfig) -> set[str]:
    """The classes (``counts``: class -> split -> documents) that ``coverage_moves`` would look at:
    a cheap first pass, so that a corpus whose classes are all covered is not read document by document."""
    return {label for label, per in counts.items() for split, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction))
            if _short(sum(per.values()), per.get(split, 0) > 0, fraction)}


def coverage_moves(rows: Iterable[tuple[str, str, str, str]], cfg: SplitConfig,
                   named: dict[str, list[str]] | None = None) -> list[dict]:
    """Moves that give every class of the labeled documents a place in each held-out split its
    size calls for. ``rows``: (doc_id, source, label, split) of the kept labeled documents.

    The hash fills val and test in proportion, but not per class: a class of 20 documents misses
    the 10% test split one time in eight (0.9 ** 20), and its figures are then never measured. A
    class with no document in a held-out split (val, test) whose fraction gives it at least half
    of one (``n * fraction >= 0.5``: what a stratified split would round up to one) takes its
    train document nearest to that split on the hash, keeping at least one in train. Only documents
    the hash placed are moved: never from a source that names that split itself (``named``). No
    class that already has a document there is touched, so large corpora are never changed, and
    the moves are the same on every run (they depend on the documents, not on the order)."""
    named = named or {}
    by_label: dict[str, list[tuple[str, str, str]]] = {}
    for doc_id, source, label, split in rows:
        by_label.setdefault(label, []).append((doc_id, source, split))
    moves = []
    for label in sorted(by_label):
        docs = by_label[label]
        current = {doc_id: split for doc_id, _, split in docs}
        for split, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            if not _short(len(docs), split in current.values(), fraction):
                continue
            train = [(_unit(doc_id, cfg), doc_id) for doc_id, source, _ in docs
                     if current[doc_id] == "train" and split not in named.get(source, ())]
            if sum(1 for s in current.values() if s == "train") < 2 or not train:
                continue
            _, doc_id = min(train)
            current[doc_id] = split
            moves.append({"doc_id": doc_id, "label": label, "from": "train", "to": split})
    return moves
