"""Reading a large ``.json`` array source: the streamed reader (``pipeline.data.sources``, element
by element) vs the baseline that loads the whole file with ``json.load`` first, both turning every
element into the same document records. Each run is a fresh process; peak RSS and seconds.

    .venv/bin/python benchmarks/bench_json_array.py [--docs 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine  # noqa: E402

CHILD = """
import json, resource, sys, time
from pipeline.data.sources import SourceConfig, _field_record, expand_source, read_file
mode, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
task = expand_source(SourceConfig(path=path))[0]
if mode == "whole":  # the baseline: the file parsed at once, then the same records per element
    n = sum(1 for i, obj in enumerate(json.load(open(path, encoding="utf-8")))
            if _field_record(task, str(i), obj, json.dumps(obj, ensure_ascii=False)))
else:
    n = sum(1 for _ in read_file(task, 1 << 20))
print(json.dumps({"records": n, "seconds": time.perf_counter() - start,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.json"
        with path.open("w", encoding="utf-8") as f:
            f.write("[")
            for i in range(args.docs):
                text = f"Word number {i} in a longer news-like sentence. " * 20
                f.write(("," if i else "") + json.dumps({"text": text, "id": i}))
            f.write("]")
        size_mb = path.stat().st_size / 1e6
        runs: dict[str, list[dict]] = {"whole": [], "stream": []}
        for _ in range(args.repeats):
            for mode in runs:  # alternate, so that machine noise hits both
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{machine()}; {args.docs} documents, {size_mb:.0f} MB JSON array; medians of {args.repeats} runs")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mib")} for m, rs in runs.items()}
    assert runs["whole"][0]["records"] == runs["stream"][0]["records"] == args.docs
    for mode, label in (("whole", "json.load, then per element (baseline)"), ("stream", "streamed (ours)")):
        print(f"{label:42s} {med[mode]['seconds']:6.2f} s   peak RSS {med[mode]['peak_mib']:7.0f} MiB")
    print(f"peak memory ratio (baseline / ours): {med['whole']['peak_mib'] / med['stream']['peak_mib']:.1f}x; "
          f"time ratio (ours / baseline): {med['stream']['seconds'] / med['whole']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
