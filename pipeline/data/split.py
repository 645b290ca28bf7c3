"""Deterministic train/val/test assignment by a hash of the document id: the same document lands
in the same split on every run and every machine, whatever the order of processing."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache

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


def split_for(doc_id: str, labeled: bool, cfg: SplitConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}\x00{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
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
