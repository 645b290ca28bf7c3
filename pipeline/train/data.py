"""Turning packed token rows into training batches for each objective (pure torch)."""

from __future__ import annotations

import json
from pathlib import Path

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


def load_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"data: {prepared_dir} is not a finished prepare output (no manifest.json); run jobs.prepare first")
    return json.loads(path.read_text())


def shard_paths(prepared_dir: str | Path, manifest: dict, split: str) -> list[str]:
    return [str(Path(prepared_dir) / s["path"]) for s in manifest["shards"] if s["split"] == split]


class LMBatcher:
    """rows of token ids -> {"input_ids", "labels"} for the causal or masked objective."""

    def __init__(self, objective: str, mask_id: int | None = None, vocab_size: int = 0,
                 special_ids: list[int] | None = None, seed: int = 0):
        if objective == "masked":
            assert mask_id is not None, "the masked objective needs a tokenizer with a mask token"
        self.objective = objective
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = special_ids or []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor) -> dict:
        input_ids = input_ids.long()
        if self.objective == "masked":
            inputs, labels = mask_tokens(input_ids, self.mask_id, self.vocab_size, self.special_ids,
                                         generator=self.generator)
            return {"input_ids": inputs, "labels": labels}
        return {"input_ids": input_ids, "labels": input_ids}
