"""Heuristic quality filters: Gopher quality and repetition, C4, FineWeb.

``check_quality(text, cfg) -> QualityResult(keep, reason, detail, text)`` is pure; the prepare
stage maps it over documents. Every rule has the default of the paper it comes from and can be
switched off by setting its threshold to ``null`` (or a whole family with ``enabled: false``).
Reasons read ``"<family>:<rule>"``, e.g. ``"gopher_quality:min_words"``.

References:
- Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
  Gopher", Appendix A.1.1 (quality filter) and Table A1 (repetition thresholds).
- C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", Section 2.2.
- FineWeb: Penedo et al. 2024, "The FineWeb Datasets", Section 3.3 (custom filters).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pipeline.config import check, check_at_least, check_fraction

# Gopher's stop words ("the, be, to, of, and, that, have, with").
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "‣", "◦", "-", "*", "–", "—", "·")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
C4_POLICY_SUBSTRINGS = (
    "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies",
)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_PUNCT_STRIP = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…–—"


@dataclass(frozen=True, kw_only=True)
class GopherQualityConfig:
    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_avg_word_length: float | None = 3.0
    max_avg_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # "#" and ellipses, each per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2

    def __post_init__(self) -> None:
        key = "quality.gopher_quality."
        for name in ("min_words", "max_words", "min_avg_word_length", "max_avg_word_length", "max_symbol_word_ratio",
                     "min_stop_words"):
            check_at_least(getattr(self, name), 0, key + name)
        for name in ("max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio"):
            check_fraction(getattr(self, name), key + name)
        for low, high in (("min_words", "max_words"), ("min_avg_word_length", "max_avg_word_length")):
            lo, hi = getattr(self, low), getattr(self, high)
            check(lo is None or hi is None or lo <= hi, f"{key}{low} ({lo}) must be <= {key}{high} ({hi})")


@dataclass(frozen=True, kw_only=True)
class GopherRepetitionConfig:
    enabled: bool = True
    # The n-gram rules measure a distribution: on a 10-word dialog turn one repeated bigram is
    # already 20% of the text. Documents shorter than this skip them (0 = always apply, as Gopher,
    # whose documents are >= 50 words after its quality filter).
    ngram_rules_min_words: int = 0
    max_dup_line_frac: float | None = 0.30
    max_dup_para_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_dup_para_char_frac: float | None = 0.20
    # n -> max fraction of characters in the most frequent n-gram
    top_ngram_max_frac: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> max fraction of characters in repeated n-grams
    dup_ngram_max_frac: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    def __post_init__(self) -> None:
        check_at_least(self.ngram_rules_min_words, 0, "quality.gopher_repetition.ngram_rules_min_words")
        for name in ("max_dup_line_frac", "max_dup_para_frac", "max_dup_line_char_frac", "max_dup_para_char_frac"):
            check_fraction(getattr(self, name), f"quality.gopher_repetition.{name}")
        for name in ("top_ngram_max_frac", "dup_ngram_max_frac"):
            for n, frac in getattr(self, name).items():
                check(n >= 1, f"quality.gopher_repetition.{name}: n-gram size must be >= 1, got {n}")
                check(0 <= frac <= 1, f"quality.gopher_repetition.{name}[{n}] must be in [0, 1], got {frac}")


@dataclass(frozen=True, kw_only=True)
class C4Config:
    enabled: bool = True
    # Line filters (they edit the document rather than drop it): C4 keeps only lines that end in
    # terminal punctuation and have at least 5 words, and removes lines mentioning javascript.
    remove_no_terminal_punct_lines: bool = True
    min_words_per_line: int | None = 5
    remove_javascript_lines: bool = True
    remove_policy_lines: bool = True
    # Document filters.
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    min_sentences: int | None = 3

    def __post_init__(self) -> None:
        check_at_least(self.min_words_per_line, 0, "quality.c4.min_words_per_line")
        check_at_least(self.min_sentences, 0, "quality.c4.min_sentences")


@dataclass(frozen=True, kw_only=True)
class FineWebConfig:
    enabled: bool = True
    min_line_punct_ratio: float | None = 0.12
    short_line_length: int = 30
    max_short_line_ratio: float | None = 0.67
    max_char_duplicates_ratio: float | None = 0.01
    max_new_line_ratio: float | None = 0.3  # newlines per word

    def __post_init__(self) -> None:
        key = "quality.fineweb."
        for name in ("min_line_punct_ratio", "max_short_line_ratio", "max_char_duplicates_ratio"):
            check_fraction(getattr(self, name), key + name)
        check_at_least(self.short_line_length, 0, key + "short_line_length")
        check_at_least(self.max_new_line_ratio, 0, key + "max_new_line_ratio")


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)


@dataclass(frozen=True)
class QualityResult:
    keep: bool
    reason: str | None
    detail: str | None
    text: str


def _drop(reason: str, value: float, threshold: float, text: str) -> QualityResult:
    return QualityResult(False, reason, f"{value:.4g} vs threshold {threshold:.4g}", text)


def _nonempty_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """Number and total characters of elements that repeat an earlier one."""
    seen: set[str] = set()
    num_dup = chars_dup = 0
    for element in elements:
        if element in seen:
            num_dup += 1
            chars_dup += len(element)
        else:
            seen.add(element)
    return num_dup, chars_dup


def gopher_quality(text: str, cfg: GopherQualityConfig) -> QualityResult | None:
    words = text.split()
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return _drop("gopher_quality:min_words", n, cfg.min_words, text)
    if cfg.max_words is not None and n > cfg.max_words:
        return _drop("gopher_quality:max_words", n, cfg.max_words, text)
    if n == 0:
        return QualityResult(False, "gopher_quality:min_words", "0 words", text)
    stripped = [w.strip(_PUNCT_STRIP) for w in words]
    lengths = [len(w) for w in stripped if w]
    avg = sum(lengths) / len(lengths) if lengths else 0.0
    if cfg.min_avg_word_length is not None and avg < cfg.min_avg_word_length:
        return _drop("gopher_quality:min_avg_word_length", avg, cfg.min_avg_word_length, text)
    if cfg.max_avg_word_length is not None and avg > cfg.max_avg_word_length:
        return _drop("gopher_quality:max_avg_word_length", avg, cfg.max_avg_word_length, text)
    if cfg.max_symbol_word_ratio is not None:
        hash_ratio = text.count("#") / n
        if hash_ratio > cfg.max_symbol_word_ratio:
            return _drop("gopher_quality:hash_ratio", hash_ratio, cfg.max_symbol_word_ratio, text)
        ellipsis_ratio = (text.count("...") + text.count("…")) / n
        if ellipsis_ratio > cfg.max_symbol_word_ratio:
            return _drop("gopher_quality:ellipsis_ratio", ellipsis_ratio, cfg.max_symbol_word_ratio, text)
    lines = _nonempty_lines(text)
    if lines and cfg.max_bullet_lines_ratio is not None:
        ratio = sum(line.startswith(BULLETS) for line in lines) / len(lines)
        if ratio > cfg.max_bullet_lines_ratio:
            return _drop("gopher_quality:bullet_lines_ratio", ratio, cfg.max_bullet_lines_ratio, text)
    if lines and cfg.max_ellipsis_lines_ratio is not None:
        ratio = sum(line.endswith(ELLIPSES) for line in lines) / len(lines)
        if ratio > cfg.max_ellipsis_lines_ratio:
            return _drop("gopher_quality:ellipsis_lines_ratio", ratio, cfg.max_ellipsis_lines_ratio, text)
    if cfg.min_alpha_words_ratio is not None:
        ratio = sum(any(c.isalpha() for c in w) for w in words) / n
        if ratio < cfg.min_alpha_words_ratio:
            return _drop("gopher_quality:alpha_words_ratio", ratio, cfg.min_alpha_words_ratio, text)
    if cfg.min_stop_words is not None:
        num_stop = sum(w.lower() in GOPHER_STOP_WORDS for w in stripped)
        if num_stop < cfg.min_stop_words:
            return _drop("gopher_quality:min_stop_words", num_stop, cfg.min_stop_words, text)
    return None


def _top_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    if len(words) < n or total_chars == 0:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    ngram, count = counts.most_common(1)[0]
    if count <= 1:
        return 0.0
    return sum(len(w) for w in ngram) * count / total_chars


def _dup_ngram_char_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words covered by repeated occurrences of n-grams (overlaps counted once)."""
    if len(words) < n or total_chars == 0:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        ngram = tuple(words[i : i + n])
        if ngram in seen:
            covered[i : i + n] = b"\x01" * n
        else:
            seen.add(ngram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig) -> QualityResult | None:
    total = len(text)
    if total == 0:
        return None
    paragraphs = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
    lines = _nonempty_lines(text)
    for kind, elements, max_frac, max_char_frac in (
        ("para", paragraphs, cfg.max_dup_para_frac, cfg.max_dup_para_char_frac),
        ("line", lines, cfg.max_dup_line_frac, cfg.max_dup_line_char_frac),
    ):
        if not elements:
            continue
        num_dup, chars_dup = _duplicates(elements)
        if max_frac is not None and num_dup / len(elements) > max_frac:
            return _drop(f"gopher_repetition:dup_{kind}_frac", num_dup / len(elements), max_frac, text)
        if max_char_frac is not None and chars_dup / total > max_char_frac:
            return _drop(f"gopher_repetition:dup_{kind}_char_frac", chars_dup / total, max_char_frac, text)
    words = text.lower().split()
    if len(words) < cfg.ngram_rules_min_words:
        return None
    word_chars = sum(len(w) for w in words)
    for n, max_frac in sorted(cfg.top_ngram_max_frac.items()):
        frac = _top_ngram_char_frac(words, n, word_chars)
        if frac > max_frac:
            return _drop(f"gopher_repetition:top_{n}gram_frac", frac, max_frac, text)
    for n, max_frac in sorted(cfg.dup_ngram_max_frac.items()):
        frac = _dup_ngram_char_frac(words, n, word_chars)
        if frac > max_frac:
            return _drop(f"gopher_repetition:dup_{n}gram_frac", frac, max_frac, text)
    return None


def count_sentences(text: str) -> int:
    return len(_SENTENCE_END.findall(text))


def c4_filter(text: str, cfg: C4Config) -> QualityResult:
    """C4's rules: drop pages with lorem ipsum or a curly bracket, remove non-sentence lines, then
    drop pages left with too few sentences. Returns the (possibly shortened) text."""
    lower = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
        return QualityResult(False, "c4:lorem_ipsum", None, text)
    if cfg.drop_curly_bracket and "{" in text:
        return QualityResult(False, "c4:curly_bracket", None, text)
    kept: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            kept.append("")  # keep paragraph breaks
            continue
        low = s.lower()
        if cfg.remove_javascript_lines and "javascript" in low:
            continue
        if cfg.remove_policy_lines and any(p in low for p in C4_POLICY_SUBSTRINGS):
            continue
        if cfg.remove_no_terminal_punct_lines and not s.endswith(TERMINAL_PUNCT):
            continue
        if cfg.min_words_per_line is not None and len(s.split()) < cfg.min_words_per_line:
            continue
        kept.append(s)
    new_text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    if not new_text:
        return QualityResult(False, "c4:no_lines_left", None, text)
    if cfg.min_sentences is not None:
        n = count_sentences(new_text)
        if n < cfg.min_sentences:
            return QualityResult(False, "c4:min_sentences", f"{n} vs threshold {cfg.min_sentences}", text)
    return QualityResult(True, None, None, new_text)


def fineweb_filter(text: str, cfg: FineWebConfig) -> QualityResult | None:
    lines = _nonempty_lines(text)
    if not lines:
        return None
    if cfg.min_line_punct_ratio is not None:
        ratio = sum(line.endswith(TERMINAL_PUNCT) for line in lines) / len(lines)
        if ratio < cfg.min_line_punct_ratio:
            return _drop("fineweb:line_punct_ratio", ratio, cfg.min_line_punct_ratio, text)
    if cfg.max_short_line_ratio is not None:
        ratio = sum(len(line) <= cfg.short_line_length for line in lines) / len(lines)
        if ratio > cfg.max_short_line_ratio:
            return _drop("fineweb:short_line_ratio", ratio, cfg.max_short_line_ratio, text)
    if cfg.max_char_duplicates_ratio is not None:
        _, chars_dup = _duplicates(lines)
        ratio = chars_dup / max(1, len(text.replace("\n", "")))
        if ratio > cfg.max_char_duplicates_ratio:
            return _drop("fineweb:char_duplicates_ratio", ratio, cfg.max_char_duplicates_ratio, text)
    if cfg.max_new_line_ratio is not None:
        ratio = text.count("\n") / max(1, len(text.split()))
        if ratio > cfg.max_new_line_ratio:
            return _drop("fineweb:new_line_ratio", ratio, cfg.max_new_line_ratio, text)
    return None


def check_quality(text: str, cfg: QualityConfig) -> QualityResult:
    """Run the enabled families in FineWeb's order: Gopher repetition, Gopher quality, C4, FineWeb."""
    if cfg.gopher_repetition.enabled and (res := gopher_repetition(text, cfg.gopher_repetition)):
        return res
    if cfg.gopher_quality.enabled and (res := gopher_quality(text, cfg.gopher_quality)):
        return res
    if cfg.c4.enabled:
        res = c4_filter(text, cfg.c4)
        if not res.keep:
            return res
        text = res.text
    if cfg.fineweb.enabled and (res := fineweb_filter(text, cfg.fineweb)):
        return res
    return QualityResult(True, None, None, text)
