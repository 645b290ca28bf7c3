"""The validation cache: read once, replayed exactly, bounded, never half-filled."""

import torch

from pipeline.train.data import ValidationCache


def _source(n: int, calls: list, rows: int = 2, width: int = 4):
    def make():
        calls.append(1)
        for i in range(n):
            yield {"input_ids": torch.full((rows, width), i), "labels": torch.full((rows, width), i)}
    return make


def _ids(batches):
    return [int(b["input_ids"][0, 0]) for b in batches]


def test_reads_once_and_replays_the_same_batches():
    calls = []
    cache = ValidationCache(_source(5, calls))
    assert _ids(cache()) == [0, 1, 2, 3, 4]
    assert _ids(cache()) == [0, 1, 2, 3, 4]
    assert _ids(cache()) == [0, 1, 2, 3, 4]
    assert len(calls) == 1


def test_max_batches_bounds_what_is_read_and_kept():
    calls = []
    cache = ValidationCache(_source(10, calls), max_batches=3)
    assert _ids(cache()) == [0, 1, 2]
    assert _ids(cache()) == [0, 1, 2]
    assert len(calls) == 1 and len(cache.batches) == 3


def test_a_consumer_that_stops_early_leaves_no_partial_cache():
    calls = []
    cache = ValidationCache(_source(5, calls))
    it = cache()
    next(it), next(it)
    it.close()
    assert cache.batches is None
    assert _ids(cache()) == [0, 1, 2, 3, 4]  # read again, in full
    assert len(calls) == 2 and len(cache.batches) == 5


def test_too_large_a_split_is_streamed_every_time():
    calls = []
    one = 2 * 4 * 8 * 2  # bytes of one batch: two int64 tensors of 2 x 4
    cache = ValidationCache(_source(5, calls), max_bytes=3 * one)
    assert _ids(cache()) == [0, 1, 2, 3, 4]
    assert _ids(cache()) == [0, 1, 2, 3, 4]
    assert len(calls) == 2 and cache.batches is None and cache.too_large
