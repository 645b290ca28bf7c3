"""Language identification with langid.py (Lui & Baldwin 2012), whose model ships inside the
package: nothing is downloaded. ``LanguageFilter(cfg).check(text) -> (keep, lang, score)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from pipeline.config import check


@dataclass(frozen=True, kw_only=True)
class LanguageConfig:
    enabled: bool = True
    allowed: list[str] = field(default_factory=lambda: ["en"])
    # FineWeb keeps documents whose English score is >= 0.65 (Penedo et al. 2024, Section 3.2).
    min_score: float = 0.65
    # Shorter texts (after normalization) are too short to identify reliably; they are kept
    # and recorded as "und" (undetermined). 0 checks everything.
    min_chars: int = 0
    max_chars: int = 10_000  # identify on a prefix: enough signal, bounded cost on huge documents

    def __post_init__(self) -> None:
        check(bool(self.allowed), "language.allowed must list at least one language code")
        check(0.0 <= self.min_score <= 1.0, f"language.min_score must be in [0, 1], got {self.min_score}")
        check(self.min_chars >= 0, f"language.min_chars must be >= 0, got {self.min_chars}")
        check(self.max_chars > 0, f"language.max_chars must be > 0, got {self.max_chars}")


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


class LanguageFilter:
    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.allowed = set(cfg.allowed)

    def check(self, text: str) -> tuple[bool, str, float]:
        if not self.cfg.enabled:
            return True, "und", 0.0
        if len(text) < self.cfg.min_chars:
            return True, "und", 0.0
        lang, score = _identifier().classify(text[: self.cfg.max_chars])
        score = float(score)
        return (lang in self.allowed and score >= self.cfg.min_score), lang, score
