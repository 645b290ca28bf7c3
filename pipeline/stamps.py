"""What a run's local inputs looked like when it was made, so that a rerun can say they changed.

A run's identity is its config (the paths it names), not the contents behind them: rerunning a
finished config reuses its result, and rerunning an interrupted one continues it. When a file or
directory it read has changed since (a corrected JSONL, a model re-exported to the same path), the
rerun says so, naming the input, instead of reusing the result in silence. A stamp is cheap and
never reads contents: a file's size and modification time; a directory's or a glob's file count,
total size and newest modification time. URIs and built-in corpus names have none and are not
compared."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STAMPS = "inputs.json"  # in the run's directory


def stamp(path: str, exclude: Path | None = None) -> dict | None:
    """``{"files", "bytes", "mtime_ns"}`` of a local file, directory (recursively) or glob, leaving out
    the hidden files, which no job reads (``sources.hidden_below``: a ``git fetch`` is no change of
    input), and those under ``exclude`` (a job's output directory inside an input directory: its own
    outputs are no change of input); None for a URI, a built-in name or a path that does not exist."""
    if "://" in path:
        return None
    import fsspec

    from pipeline.data.sources import listed_files

    p = Path(path)
    if p.is_file():
        files = [p]
    elif (listed := listed_files(fsspec.filesystem("file"), str(p.absolute()))) is not None:
        files = [Path(f) for f in listed[0]]
    else:
        return None
    if exclude is not None and "://" not in str(exclude) and not p.resolve().is_relative_to(exclude.resolve()):
        files = [f for f in files if not f.resolve().is_relative_to(exclude.resolve())]
    stats = [f.stat() for f in files if f.exists()]
    return {"files": len(stats), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _describe(key: str, path: str, before: dict, now: dict | None) -> str:
    if now is None:
        return f"{key} ({path}): gone"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now["mtime_ns"] / 1e9))
    parts = [f"{before[k]:,} -> {now[k]:,} {k}" for k in ("files", "bytes") if before[k] != now[k]]
    return f"{key} ({path}): " + ", ".join(parts + [f"modified {when}"])


FINISHED = "its finished result is reused"
CHECKPOINT = "it continues from its latest checkpoint"


def check_inputs(run_dir: Path, inputs: dict[str, str], job: str, reused: str | None,
                 exclude: Path | None = None) -> list[str]:
    """Compare ``inputs`` (config key -> path) with the stamps a run recorded when it started, when
    a rerun reuses some of its work (``reused`` says what: ``FINISHED``, ``CHECKPOINT``...), and warn
    about each input that changed; a run that reuses nothing (new, or stopped before its first
    checkpoint) records them afresh. ``exclude``: the job's output directory, left out of the stamps
    of the input directories that hold it. Returns the descriptions of the changes."""
    path = Path(run_dir) / STAMPS
    now = {key: {"path": p, "stamp": stamp(p, exclude)} for key, p in inputs.items() if p}
    if reused is None or not path.exists():
        if now or path.exists():
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(now, indent=1))
        return []
    recorded = json.loads(path.read_text())
    changed = []
    for key, old in recorded.items():
        new = now.get(key)
        if new is not None and new["path"] != old["path"]:  # a config YAML that now resolves elsewhere
            changed.append(f"{key}: now {new['path']}, was {old['path']}")
        elif new is not None and old["stamp"] is not None and new["stamp"] != old["stamp"]:
            changed.append(_describe(key, old["path"], old["stamp"], new["stamp"]))
    if changed:
        logger.warning("%s: inputs changed since %s was made: %s. Its config is the same, so %s; to redo it on "
                       "the inputs as they are now, rerun with another name= (or delete that directory)", job, run_dir,
                       "; ".join(changed), reused)
    return changed
