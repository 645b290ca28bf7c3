"""A rerun of a finished or interrupted run says which of its local inputs changed since it was made."""

from __future__ import annotations

import json
import logging
import os

from pipeline.stamps import CHECKPOINT, FINISHED, STAMPS, check_inputs, stamp


def test_stamps_of_files_directories_and_globs_and_none_for_the_rest(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("abc")
    (tmp_path / "d" / "sub" / "b.txt").write_text("de")
    assert stamp(str(tmp_path / "d" / "a.txt"))["bytes"] == 3
    assert {k: v for k, v in stamp(str(tmp_path / "d")).items() if k != "mtime_ns"} == {"files": 2, "bytes": 5}
    assert stamp(str(tmp_path / "d" / "*.txt"))["files"] == 1 and stamp(str(tmp_path / "d" / "**" / "*.txt"))["files"] == 2
    (tmp_path / "d" / "out").mkdir()
    (tmp_path / "d" / "out" / "shard.parquet").write_bytes(b"x" * 100)  # a job's own output inside its input
    assert stamp(str(tmp_path / "d"), exclude=tmp_path / "d" / "out")["files"] == 2
    assert stamp(str(tmp_path / "d"))["files"] == 3
    before = stamp(str(tmp_path / "d"))
    (tmp_path / "d" / ".git").mkdir()  # hidden files, which no job reads: a git fetch is no change of input
    (tmp_path / "d" / ".git" / "FETCH_HEAD").write_text("abc")
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\0")
    assert stamp(str(tmp_path / "d")) == before and stamp(str(tmp_path / "d" / "*"))["files"] == 1
    assert stamp(str(tmp_path / "d" / ".git"))["files"] == 1  # what the path names itself counts
    assert stamp("s3://bucket/corpus/") is None and stamp("chatterbot") is None and stamp(str(tmp_path / "nope")) is None


def test_a_rerun_names_each_changed_input_and_the_way_to_redo_it(tmp_path, caplog):
    data, model, run = tmp_path / "data.jsonl", tmp_path / "model", tmp_path / "run"
    data.write_text('{"text": "a"}\n')
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    inputs = {"data.train": str(data), "base_model": str(model), "data.val": "chatterbot"}
    assert check_inputs(run, inputs, "finetune", None) == []  # a new run records them
    assert set(json.loads((run / STAMPS).read_text())) == {"data.train", "base_model", "data.val"}
    assert check_inputs(run, inputs, "finetune", FINISHED) == []  # nothing changed: nothing said
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    os.utime(model / "model.safetensors", ns=(1, 10**18))  # re-exported: the same size, another time
    with caplog.at_level(logging.WARNING, logger="pipeline.stamps"):
        changed = check_inputs(run, inputs, "finetune", FINISHED)
    assert [c.split(" (")[0] for c in changed] == ["data.train", "base_model"]
    assert changed[0].endswith(f"{data}): 14 -> 28 bytes, modified " + changed[0].split("modified ")[1])
    assert changed[1].startswith(f"base_model ({model}): modified 2001-09-")  # the time only: the same size
    assert "its finished result is reused" in caplog.text and "another name=" in caplog.text
    # a config YAML that now resolves to another directory is a change too
    moved = check_inputs(run, {**inputs, "base_model": str(tmp_path / "other")}, "finetune", CHECKPOINT)
    assert f"base_model: now {tmp_path / 'other'}, was {model}" in moved
    # a run that stopped before its first checkpoint reuses nothing: it starts over on the inputs as
    # they are, which it records afresh
    assert check_inputs(run, inputs, "finetune", None) == [] and check_inputs(run, inputs, "finetune", FINISHED) == []
    # a run without inputs (a pretraining run from scratch) leaves no file and makes no directory
    assert check_inputs(tmp_path / "r3", {}, "x", None) == [] and not (tmp_path / "r3").exists()
