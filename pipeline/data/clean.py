"""Per-document cleaning: normalize -> quality filters -> harmful content -> PII -> language.

``DocumentCleaner(cfg).clean(record) -> row`` is pure and runs on one parsed record; the prepare
stage maps it over every record (``pipeline/data/ray_ops.py``). The row carries ``status``
(kept/dropped/quarantined) and, when not kept, the ``reason`` and a short excerpt for the audit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import schema as S
from pipeline.config import check
from pipeline.data.harmful import BlocklistFilter, HarmfulConfig
from pipeline.data.language import LanguageConfig, LanguageFilter
from pipeline.data.normalize import NormalizeConfig, normalize_text
from pipeline.data.pii import PIIConfig, redact_pii
from pipeline.data.quality import QualityConfig, check_quality
from pipeline.data.sources import EXCERPT_CHARS


@dataclass(frozen=True, kw_only=True)
class ParseConfig:
    # Larger records are quarantined as "too_large" (Gopher caps documents at 100,000 words,
    # about 600 kB): a single huge record would otherwise stall a worker on quadratic-ish filters.
    max_doc_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        check(self.max_doc_bytes > 0, f"parse.max_doc_bytes must be > 0, got {self.max_doc_bytes}")


@dataclass(frozen=True, kw_only=True)
class CleanConfig:
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    harmful: HarmfulConfig = field(default_factory=HarmfulConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)


class DocumentCleaner:
    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.blocklist = BlocklistFilter(cfg.harmful)
        self.language = LanguageFilter(cfg.language)

    def clean(self, record: dict) -> dict:
        if record.get(S.STATUS) == S.STATUS_QUARANTINED:
            return record
        raw = record[S.TEXT]
        row = dict(record, **{S.N_CHARS_RAW: len(raw)})

        def drop(reason: str, detail: str | None = None) -> dict:
            row.update({S.STATUS: S.STATUS_DROPPED, S.REASON: reason, S.DETAIL: detail,
                        S.RAW_EXCERPT: raw[:EXCERPT_CHARS], S.TEXT: None})
            return row

        # 1) normalize
        text = normalize_text(raw, self.cfg.normalize)
        if not text:
            return drop("normalize:empty", "nothing left after normalization")
        # 2) quality heuristics (C4 may remove lines)
        result = check_quality(text, self.cfg.quality)
        if not result.keep:
            return drop(result.reason or "quality", result.detail)
        text = result.text
        # 3) harmful content
        ok, detail = self.blocklist.check(text)
        if not ok:
            return drop("harmful:blocklist", detail)
        # 4) PII redaction (edits, never drops)
        text, counts = redact_pii(text, self.cfg.pii)
        row.update({S.PII_EMAIL: counts["email"], S.PII_PHONE: counts["phone"],
                    S.PII_IP: counts["ip_address"], S.PII_CREDIT_CARD: counts["credit_card"]})
        # 5) language
        ok, lang, score = self.language.check(text)
        row.update({S.LANG: lang, S.LANG_SCORE: score})
        if not ok:
            return drop("language:not_allowed", f"{lang} ({score:.2f})")
        row.update({S.STATUS: S.STATUS_KEPT, S.TEXT: text, S.N_CHARS: len(text)})
        return row
