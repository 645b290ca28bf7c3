"""Harmful-content filter: a configurable blocklist of words and phrases (C4 drops any page that
contains a word from its "bad words" list; we count hits and drop at ``min_hits``).

``BlocklistFilter(cfg).check(text) -> (keep, detail)`` is pure; a small default list ships in
``pipeline/resources/blocklist.txt``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

from pipeline.config import check


@dataclass(frozen=True, kw_only=True)
class HarmfulConfig:
    enabled: bool = True
    blocklist_path: str | None = None  # None: the shipped default list
    extra_terms: list[str] = field(default_factory=list)
    min_hits: int = 1

    def __post_init__(self) -> None:
        check(self.min_hits >= 1, f"harmful.min_hits must be >= 1, got {self.min_hits}")
        if self.blocklist_path is not None:
            from pipeline.data.sources import path_kind

            check(path_kind(self.blocklist_path) == "file", f"harmful.blocklist_path {self.blocklist_path}: not found "
                                                           f"(a local path or URI of a text file)")


def load_terms(cfg: HarmfulConfig) -> list[str]:
    if cfg.blocklist_path is None:
        raw = resources.files("pipeline").joinpath("resources/blocklist.txt").read_text(encoding="utf-8")
    else:
        from pipeline.data.sources import read_small_text

        try:
            raw = read_small_text(cfg.blocklist_path)
        except ValueError as exc:
            raise ValueError(f"harmful.blocklist_path {exc}") from None
    terms = [line.strip().lower() for line in raw.splitlines() if line.strip() and not line.startswith("#")]
    return sorted(set(terms + [t.strip().lower() for t in cfg.extra_terms if t.strip()]))


class BlocklistFilter:
    def __init__(self, cfg: HarmfulConfig):
        self.cfg = cfg
        terms = load_terms(cfg)
        # Longest first so that phrases win over their words; \s+ lets a phrase span line breaks.
        alternatives = [r"\s+".join(map(re.escape, t.split())) for t in sorted(terms, key=len, reverse=True)]
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.I) if terms else None

    def check(self, text: str) -> tuple[bool, str | None]:
        if not self.cfg.enabled or self.pattern is None:
            return True, None
        hits = [" ".join(m.group(0).lower().split()) for m in self.pattern.finditer(text)]
        if len(hits) >= self.cfg.min_hits:
            return False, f"{len(hits)} hit(s): {', '.join(sorted(set(hits))[:5])}"
        return True, None
