"""Class coverage of the held-out splits: the hash split, repaired where a class misses val or test."""

from __future__ import annotations

import random

from pipeline.data.split import SplitConfig, coverage_moves, split_for

CFG = SplitConfig(val_fraction=0.05, test_fraction=0.10)


def rows_for(label: str, n: int, source: str = "s", start: int = 0) -> list[tuple[str, str, str, str]]:
    return [(f"{source}:{label}:{i}", source, label, split_for(f"{source}:{label}:{i}", True, CFG))
            for i in range(start, start + n)]


def first_without(splits: str | set[str], n: int, label: str = "x") -> list[tuple[str, str, str, str]]:
    """A class of ``n`` documents the hash gives none of ``splits`` (found by shifting the ids)."""
    splits = {splits} if isinstance(splits, str) else splits
    for start in range(0, 1_000_000, n):
        rows = rows_for(label, n, start=start)
        if not splits & {r[3] for r in rows}:
            return rows
    raise AssertionError("no such class")


def test_a_class_missing_from_test_gets_its_train_document_nearest_on_the_hash():
    rows = first_without("test", 20)
    moves = coverage_moves(rows, CFG)
    assert [(m["label"], m["from"], m["to"]) for m in moves if m["to"] == "test"] == [("x", "train", "test")]
    moved = next(m["doc_id"] for m in moves if m["to"] == "test")
    from pipeline.data.split import _unit

    train = [r[0] for r in rows if r[3] == "train"]
    assert moved == min(train, key=lambda d: _unit(d, CFG))
    # the same moves whatever order the documents come in
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert coverage_moves(shuffled, CFG) == moves


def test_classes_already_covered_or_too_small_are_left_alone():
    big = rows_for("big", 400)
    assert {r[3] for r in big} == {"train", "val", "test"} and coverage_moves(big, CFG) == []
    # 4 documents: 0.4 of one expected in test (< 0.5), 0.2 in val: a stratified split gives them none
    small = first_without("test", 4, "small")
    assert [m for m in coverage_moves(small, CFG) if m["label"] == "small"] == []
    # 10 documents: half of one in val, one in test: both get one, and train keeps the rest
    ten = first_without({"val", "test"}, 10, "t")
    moves = coverage_moves(ten, CFG)
    assert sorted(m["to"] for m in moves) == ["test", "val"] and len({m["doc_id"] for m in moves}) == 2
    # a class with one train document keeps it
    assert coverage_moves([("a", "s", "c", "train")], SplitConfig(val_fraction=0.5, test_fraction=0.4)) == []


def test_a_source_that_names_the_split_itself_gives_no_document_to_it():
    rows = first_without("test", 20)
    assert coverage_moves(rows, CFG, named={"s": ["test"]}) == [m for m in coverage_moves(rows, CFG) if m["to"] != "test"]
    # another source's document of the class may go
    other = [(f"o:{i}", "o", "x", "train") for i in range(3)]
    moves = coverage_moves(rows + other, CFG, named={"s": ["test"]})
    assert [m["doc_id"].startswith("o:") for m in moves if m["to"] == "test"] == [True]


def test_the_first_pass_finds_the_classes_the_moves_look_at():
    from pipeline.data.split import uncovered

    rows = first_without("test", 20) + rows_for("big", 400) + first_without("test", 4, "small")
    counts: dict[str, dict[str, int]] = {}
    for _, _, label, split in rows:
        counts.setdefault(label, {}).setdefault(split, 0)
        counts[label][split] += 1
    assert uncovered(counts, CFG) == {m["label"] for m in coverage_moves(rows, CFG)} == {"x"}
