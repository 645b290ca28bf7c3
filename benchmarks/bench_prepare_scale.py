"""Benchmark (c): the whole prepare stage on 1x and 10x the demo corpora (bbc-news + chatterbot),
the 10x corpus made of perturbed copies, on a local Ray cluster; reports the time ratio.

    .venv/bin/python benchmarks/bench_prepare_scale.py [--scales 1 10] [--repeats 2]

Each copy replaces 25% of each document's words with other words of the same document, so copies
are neither exact nor near duplicates of each other (5-gram Jaccard well below the 0.8 threshold)
and the 10x corpus really holds about 10x the distinct work. Every run writes to a fresh output
directory (nothing is reused).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import demo_texts, machine  # noqa: E402


def perturb(rng: random.Random, text: str) -> str:
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        for i in rng.sample(range(len(words)), len(words) // 4):
            words[i] = rng.choice(words)
        lines.append(" ".join(words))
    return "\n".join(lines)


def write_corpus(path: Path, docs: list[dict], scale: int) -> None:
    rng = random.Random(scale)
    with path.open("w") as f:
        for copy in range(scale):
            for d in docs:
                text = d["text"] if copy == 0 else perturb(rng, d["text"])
                f.write(json.dumps({"text": text, "label": d.get("label")}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    docs = demo_texts()
    work = Path(tempfile.mkdtemp(prefix="bench_scale"))
    results: dict[int, list[float]] = {}
    for scale in args.scales:
        corpus = work / f"corpus_x{scale}"
        corpus.mkdir()
        # 8 files so that reading parallelises as it would on a real corpus
        write_corpus(corpus / "all.jsonl", docs, scale)
        lines = (corpus / "all.jsonl").read_text().splitlines(keepends=True)
        (corpus / "all.jsonl").unlink()
        for i in range(8):
            (corpus / f"part{i}.jsonl").write_text("".join(lines[i::8]))
        for rep in range(args.repeats):
            out = work / f"out_x{scale}_{rep}"
            cmd = [sys.executable, "-m", "jobs.prepare", "--config", "jobs/configs/prepare_demo.yaml",
                   "--input", str(corpus), "--output", str(out)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit(f"prepare failed at scale {scale}")
            manifest = json.loads(next(out.glob("*/manifest.json")).read_text())
            results.setdefault(scale, []).append(elapsed)
            c = manifest["counts"]
            print(f"x{scale} run {rep}: {elapsed:.1f} s wall (stage {manifest['seconds']} s); input {c['input_docs']}, "
                  f"kept {c['kept_docs']}, exact {manifest['duplicates']['exact']}, fuzzy {manifest['duplicates']['fuzzy']}, "
                  f"train tokens {manifest['tokens']['train']}", flush=True)
            shutil.rmtree(out)
    print(f"machine: {machine()}")
    med = {s: statistics.median(v) for s, v in results.items()}
    for s, v in med.items():
        print(f"x{s}: median {v:.1f} s over {len(results[s])} run(s)")
    if 1 in med and len(med) > 1:
        for s in med:
            if s != 1:
                print(f"time ratio x{s}/x1: {med[s] / med[1]:.2f} (goal <= 11 for x10)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
