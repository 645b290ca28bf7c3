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


def decode_with_arrivals(engine, reqs: list, arrivals: dict[int, list[int]], max_steps: int = 80) -> list[list[int]]:
    """Continuous batching by hand: request 0 starts; at step s the requests ``arrivals[s]`` are
    prefilled and merged into the running batch; finished rows leave after every step. Returns
    each request's tokens, in request order."""
    run = engine.begin(reqs[:1], owners=[0])
    done: dict[int, list[int]] = {}
    for step in range(max_steps):
        if step in arrivals:
            new = engine.begin([reqs[i] for i in arrivals[step]], owners=list(arrivals[step]))
            engine.step(new)
            run = engine.merge(run, new)
        else:
            engine.step(run)
        done.update({o: g.token_ids for o, g in engine.compact(run)})
        if not len(run):
            break
    assert not len(run) and run.ids.shape == run.mask.shape
    return [done[i] for i in range(len(reqs))]
