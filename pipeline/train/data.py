"""Turning packed token rows into training batches for each objective (pure torch)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.model.masking import mask_tokens


def resolve_prepared(data: str) -> Path:
    """``data`` is a prepare output directory, or a prepare config YAML whose (deterministic)
    output directory is used: stages find each other through paths, not run ids."""
    if data.endswith((".yaml", ".yml")):
        from pipeline.config import load_config
        from pipeline.data.prepare import PrepareConfig

        return load_config(PrepareConfig, data).run_dir
    return Path(data)


def load_manifest(prepared_dir: str | Path, key: str = "data", hint: str = "") -> dict:
    """A prepare output's manifest; an error naming the config ``key`` (and ``hint``, another way
    to give the input) when ``prepared_dir`` is not a finished prepare output."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{key}: {prepared_dir} is not a finished prepare output (no manifest.json); run jobs.prepare "
                         f"first{hint}")
    return json.loads(path.read_text())


def shard_paths(prepared_dir: str | Path, manifest: dict, split: str) -> list[str]:
    return [str(Path(prepared_dir) / s["path"]) for s in manifest["shards"] if s["split"] == split]


def split_rows(manifest: dict, split: str) -> int:
    """The rows (packed sequences) of a split's shards, from the manifest."""
    return sum(s.get("rows", 0) for s in manifest["shards"] if s["split"] == split)


def sample_rows(rows: list, n: int, seed: int = 0) -> list:
    """``n`` of ``rows`` drawn at random with ``seed`` (all of them when there are no more than
    ``n``; ``n <= 0`` means all), kept in their original order. Labeled files often come sorted by
    label, so their first ``n`` rows can all be one class."""
    if n <= 0 or len(rows) <= n:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def sample_shard_rows(files: list[str], n: int, seed: int = 0, column: str = "input_ids") -> list:
    """``n`` rows of ``column`` drawn at random (seeded) from all of ``files`` together, in file
    order (every row when they hold no more than ``n``; ``n <= 0``: every row). Shards follow the
    sources' order, so the first rows would all come from the first source. Only the shards the
    sample hits are read."""
    import pyarrow.parquet as pq

    starts = [0]
    for f in files:
        starts.append(starts[-1] + pq.ParquetFile(f).metadata.num_rows)
    picked = sample_rows(range(starts[-1]), n, seed)  # global row numbers, ascending
    rows: list = []
    for k, f in enumerate(files):
        local = [i - starts[k] for i in picked if starts[k] <= i < starts[k + 1]]
        if local:
            values = pq.read_table(f, columns=[column]).column(column)
            rows += [values[i].as_py() for i in local]
    return rows


def prepared_tokenizer_dir(prepared_dir: str | Path, manifest: dict) -> Path:
    """The tokenizer the shards were made with: the prepare output's copy (the manifest's path is
    relative to where prepare ran)."""
    local = Path(prepared_dir) / "tokenizer"
    return (local if local.is_dir() else Path(manifest["tokenizer"])).resolve()


def check_same_tokenizer(prepared_dir: str | Path, model_dir: str | Path, key: str) -> None:
    """Packed shards hold token ids: a model with another tokenizer would read them as other
    tokens and score them without any error. Every token of the data's tokenizer must have the
    same id in the model's (the model may have more: padding, chat roles)."""
    from transformers import AutoTokenizer

    from pipeline.config import check

    data_tok = prepared_tokenizer_dir(prepared_dir, load_manifest(prepared_dir))
    try:
        model_vocab = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).get_vocab()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key}: the model {model_dir} has no tokenizer to check the data against ({exc})") from None
    data_vocab = AutoTokenizer.from_pretrained(str(data_tok), local_files_only=True).get_vocab()
    differ = sorted(t for t, i in data_vocab.items() if model_vocab.get(t) != i)
    check(not differ, f"{key}: the shards of {prepared_dir} were made with another tokenizer than the model "
                      f"{model_dir}'s ({len(differ)} of {len(data_vocab)} tokens differ, e.g. {differ[:3]}); "
                      f"prepare the data with the model's tokenizer (prepare's tokenizer.path)")


def stream_seed(*keys: int) -> int:
    """A seed for the random stream named by ``keys`` (e.g. seed, rank, epoch): distinct keys give
    independent streams (seed 1 of rank 0 is not seed 0 of rank 1)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# The token id of a filler row's every position: a packed row that only evens out the workers'
# shares of a split (``pipeline.train.ray_train.filler_count``); it carries no loss.
FILLER_ID = -100


def filler_row(row: dict) -> dict:
    """A row shaped like ``row`` that carries no loss: its labels are all -100 (the ignored label
    of every ``transformers`` loss); a packed token row, which has no labels, is all ``FILLER_ID``.
    Ray Train gives every worker an equal share of a split and leaves out the remainder of rows /
    workers: fillers make the rows divide, so that every real row is read."""
    if "labels" not in row:
        return {**row, "input_ids": [FILLER_ID] * len(row["input_ids"])}
    labels = row["labels"]
    return {**row, "labels": [-100] * len(labels) if isinstance(labels, (list, tuple)) else -100}


class LMBatcher:
    """rows of token ids -> {"input_ids", "labels"} for the causal or masked objective. Filler
    rows (``FILLER_ID``) get labels of -100 only: they carry no loss."""

    def __init__(self, objective: str, mask_id: int | None = None, vocab_size: int = 0,
                 special_ids: list[int] | None = None, seed: int = 0):
        if objective == "masked":
            assert mask_id is not None, "the masked objective needs a tokenizer with a mask token"
        self.objective = objective
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = special_ids or []
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def for_epoch(self, epoch: int | None, rank: int = 0) -> "LMBatcher":
        """This batcher for one rank's epoch (``epoch`` None: its validation split), its masks
        drawn from a generator keyed by (seed, rank, epoch) alone.

        A run resumed in epoch e then draws, batch for batch, the masks the uninterrupted run drew
        there (it replays the epoch's skipped batches through the same generator), whatever it
        drew in earlier epochs; and no two ranks draw the same mask pattern. The causal objective
        draws nothing: the batcher itself is returned."""
        if self.objective != "masked":
            return self
        twin = copy.copy(self)
        twin.generator = torch.Generator().manual_seed(stream_seed(self.seed, rank, 0 if epoch is None else epoch + 1))
        return twin

    def __call__(self, input_ids: torch.Tensor) -> dict:
        input_ids = input_ids.long()
        filler = input_ids == FILLER_ID
        if filler.any():
            input_ids = input_ids.masked_fill(filler, self.special_ids[0] if self.special_ids else 0)
        if self.objective == "masked":
            inputs, labels = mask_tokens(input_ids, self.mask_id, self.vocab_size, self.special_ids,
                                         generator=self.generator)
            return {"input_ids": inputs, "labels": labels.masked_fill(filler, -100)}
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(filler, -100)}


VAL_CACHE_BYTES = 256 * 2**20


def batch_bytes(batch: dict) -> int:
    return sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))


class ValidationCache:
    """A worker's validation batches, read from ``source()`` at the first evaluation and replayed
    from memory at every later one.

    Re-reading a small validation split costs more than evaluating it: with Ray Data every read is
    a new streaming execution (seconds of task scheduling on a busy node). Replaying also makes
    every evaluation of a run score the same rows (and, for the masked objective, the same masks),
    so val losses compare across steps. At most ``max_batches`` batches are read (0 = all); when the
    batches exceed ``max_bytes`` nothing is kept and every evaluation streams the split again."""

    def __init__(self, source: Callable[[], Iterator[dict]], max_batches: int = 0,
                 max_bytes: int = VAL_CACHE_BYTES) -> None:
        self.source = source
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.batches: list[dict] | None = None  # complete once set
        self.too_large = False

    def __call__(self) -> Iterator[dict]:
        if self.batches is not None:
            return iter(self.batches)
        return self._read()

    def _read(self) -> Iterator[dict]:
        kept: list[dict] | None = None if self.too_large else []
        size = 0
        for i, batch in enumerate(self.source()):
            if self.max_batches and i >= self.max_batches:
                break
            if kept is not None:
                size += batch_bytes(batch)
                if size > self.max_bytes:
                    kept, self.too_large = None, True
                else:
                    kept.append(batch)
            yield batch
        # reached only when the whole (bounded) split was read: a consumer that stopped early
        # leaves nothing half-filled behind
        if kept is not None:
            self.batches = kept
