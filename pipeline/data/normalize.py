"""Text normalization: mojibake repair, NFKC, control characters and whitespace.

Run inside the prepare stage (``normalize_text(text, cfg)``) on every parsed document.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import ftfy

from pipeline.data.quality import TERMINAL_PUNCT

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_HSPACE = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r" +\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SPECIAL = re.compile(r"[^\w\s.,;:!?'\"()\-]")


@dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
    """How documents are normalized.

    ``lowercase`` and ``remove_special_chars`` exist for parity with classic NLP pipelines but are
    off by default: a language model must learn case (names, sentence starts, acronyms) and the
    punctuation, symbols and code that real text contains; modern LLM corpora (C4, The Pile,
    FineWeb, Dolma) keep both. Turning them on also changes what the tokenizer learns.
    """

    fix_mojibake: bool = True  # ftfy repairs UTF-8 decoded as Latin-1/cp1252 ("cafÃ©" -> "café")
    unicode_form: str = "NFKC"
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space, 3+ newlines -> 2
    remove_control_chars: bool = True
    lowercase: bool = False
    remove_special_chars: bool = False
    # join the lines of hard-wrapped paragraphs (books, RFCs, e-mails, READMEs wrapped at a fixed
    # width), so that the rules that judge lines (C4's, FineWeb's) judge sentences, not fragments
    unwrap_paragraphs: bool = True

    def __post_init__(self) -> None:
        if self.unicode_form not in ("NFC", "NFKC", "NFD", "NFKD", "none"):
            raise ValueError(
                f"normalize.unicode_form must be one of NFC, NFKC, NFD, NFKD, none; got {self.unicode_form!r}"
            )


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    # 1) repair mojibake before Unicode normalization, which would otherwise freeze broken sequences
    if cfg.fix_mojibake:
        text = ftfy.fix_text(text, normalization=None)
    # 2) compatibility normalization (full-width letters, ligatures, non-breaking spaces)
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # 3) control and invisible characters (tabs and newlines are kept)
    if cfg.remove_control_chars:
        text = _CONTROL.sub("", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.remove_special_chars:
        text = _SPECIAL.sub(" ", text)
    # 4) whitespace
    if cfg.collapse_whitespace:
        text = _HSPACE.sub(" ", text)
        text = _TRAILING.sub("\n", text)
        text = "\n".join(line.strip() for line in text.split("\n"))
        text = _MANY_NEWLINES.sub("\n\n", text)
    if cfg.unwrap_paragraphs:
        text = unwrap_paragraphs(text)
    return text.strip()


_SENTENCE_END = TERMINAL_PUNCT + (":",)  # a line that ends a sentence, or opens what follows
# a line that opens a list item, heading, quote, table row, rule or code fence is a block of its own
_BLOCK_START = re.compile(r"\s*([-*+\u2022]\s|[>|]|#{1,6}\s|\d{1,3}[.)]\s|`{3}|~{3}|[-=_*]{3})")
MIN_WRAP_WIDTH = 40


def hard_wrapped(lines: list[str]) -> bool:
    """Whether the lines of one paragraph are prose wrapped at a width: at least 3 lines; every
    line but the last at least ``MIN_WRAP_WIDTH`` characters and 0.6 times the longest of them; at
    most a third of them ending a sentence (a line of its own, as a dialog's turns, mostly does);
    at least half of the lines after the first going on in lower case (a break inside a sentence;
    a page's menu, titles and headlines above its text open in capitals); none opening a list item,
    heading, quote, table row, rule or code fence."""
    if len(lines) < 3:
        return False
    body = [line.rstrip() for line in lines[:-1]]
    width = max(len(line) for line in body)
    return (all(len(line) >= max(MIN_WRAP_WIDTH, 0.6 * width) for line in body)
            and sum(line.endswith(_SENTENCE_END) for line in body) * 3 <= len(body)
            and sum(line.lstrip()[:1].islower() for line in lines[1:]) * 2 >= len(lines) - 1
            and not any(_BLOCK_START.match(line) for line in lines))


def unwrap_paragraphs(text: str) -> str:
    """``text`` with each hard-wrapped paragraph (``hard_wrapped``; paragraphs are separated by
    blank lines) joined into one line; other paragraphs are kept line for line."""
    paragraphs = [p.split("\n") for p in text.split("\n\n")]
    return "\n\n".join(" ".join(line.strip() for line in lines) if hard_wrapped(lines) else "\n".join(lines)
                         for lines in paragraphs)
