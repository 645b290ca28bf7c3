"""Small synthetic corpora for tests: varied pseudo-words in English-like sentences, so that the
quality filters keep them and no two documents are near-duplicates."""

from __future__ import annotations

import json
import random
from pathlib import Path


def word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randrange(2, 5)))


def sentence(rng: random.Random) -> str:
    w = [word(rng) for _ in range(8)]
    return f"The {w[0]} {w[1]} of the {w[2]} {w[3]} and {w[4]} {w[5]} to {w[6]} with {w[7]}."


def document(rng: random.Random, paragraphs: int = 4) -> str:
    return "\n\n".join(" ".join(sentence(rng) for _ in range(3)) for _ in range(paragraphs))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
