"""Checkpoints in Hugging Face format: ``save_pretrained`` (safetensors) plus the tokenizer, and
``training_state.pt`` with the optimizer, step, data position and RNG states to resume exactly.
A checkpoint directory is itself a loadable model (``AutoModelForCausalLM.from_pretrained``)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from pipeline.train.loop import TrainState, unwrap

STATE_FILE = "training_state.pt"

logger = logging.getLogger(__name__)


def rng_state() -> dict:
    """This process's random number generators (dropout, sampling, shuffles)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])  # dropout masks on GPU continue as they were


def save_checkpoint(path: str | Path, model, tokenizer=None, optimizer=None, state: TrainState | None = None,
                    extra: dict | None = None, *, model_state: dict | None = None,
                    optimizer_state: dict | None = None, rng_by_rank: list[dict] | None = None) -> Path:
    """``model_state`` / ``optimizer_state``: full state dicts gathered from a sharded model
    (``pipeline.train.sharding.full_state``) to save instead of the module's own (the optimizer's
    keyed by parameter name). ``rng_by_rank``: every worker's ``rng_state()``, gathered by the
    rank that saves, so that each worker resumes its own random streams (dropout differs by rank)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    if model_state is not None:
        bare.save_pretrained(str(path), state_dict=model_state, safe_serialization=True)
        _plain_architecture(path, bare)
    else:
        bare.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    if optimizer is not None or state is not None or optimizer_state is not None:
        torch.save({
            "optimizer": optimizer.state_dict() if optimizer is not None and optimizer_state is None else None,
            "optimizer_by_name": optimizer_state,
            "state": state.to_dict() if state is not None else None,
            "rng": rng_state(),
            "rng_by_rank": rng_by_rank,
            "extra": extra or {},
        }, path / STATE_FILE)
        if state is not None:
            write_json(path / "trainer_state.json", {"step": state.step, "epoch": state.epoch,
                                                     "batches_in_epoch": state.batches_in_epoch})
    return path


def _plain_architecture(path: Path, model) -> None:
    """FSDP2 changes a sharded module's class (``FSDPGPT2LMHeadModel``); the saved config names
    the model's own class so that any Hugging Face loader reads it."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    fixed = [a[len("FSDP"):] if a.startswith("FSDP") else a for a in archs]
    if fixed != archs:
        cfg["architectures"] = fixed
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint directory under ``root`` with the highest training step, if any.
    An incomplete one (see ``incomplete``) is skipped with a warning: the one before it is taken."""
    found = []
    for marker in Path(root).glob("checkpoint_*/trainer_state.json"):
        step = checkpoint_step(marker.parent)
        if step is None:
            logger.warning("%s: not resumable (trainer_state.json unreadable); skipped", marker.parent)
        else:
            found.append((step, marker.parent))
    for step, path in sorted(found, key=lambda sp: sp[0], reverse=True):
        reason = incomplete(path)
        if reason is None:
            return path
        logger.warning("%s (step %s): not resumable (%s); skipped", path, step, reason)
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of the checkpoint directory ``path`` (None when its trainer_state.json
    is missing or unreadable)."""
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def incomplete(path: str | Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None when it is complete.
    Ray copies a reported checkpoint into storage file by file, several at a time and with no final
    rename, so a job killed during the copy leaves a directory whose files are missing or cut
    short. Checked without loading anything: the JSON files parse, every safetensors file (and
    every shard its index names) is as long as its header says, the training state's zip archive
    has its closing directory."""
    import zipfile

    path = Path(path)
    for name in ("config.json", "trainer_state.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError):
            return f"{name} missing or cut short"
    index = path / "model.safetensors.index.json"
    try:
        weights = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.exists() else [path / "model.safetensors"]
    except (OSError, ValueError, KeyError, AttributeError):
        return f"{index.name} unreadable"
    for file in weights:
        reason = _safetensors_incomplete(file)
        if reason:
            return f"{file.name}: {reason}"
    if not zipfile.is_zipfile(path / STATE_FILE):
        return f"{STATE_FILE} missing or cut short"
    return None


def _safetensors_incomplete(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header of tensor byte ranges, then the
    data: complete when its size is the header's end plus the last range's end."""
    try:
        with file.open("rb") as f:
            size = file.stat().st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return "cut short"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and "data_offsets" in t]
    if size < 8 + n + max(ends, default=0):
        return f"cut short ({size} of {8 + n + max(ends, default=0)} bytes)"
    return None


def load_training_state(path: str | Path, optimizer=None, model=None, rank: int = 0,
                        world_size: int = 1) -> tuple[TrainState, dict]:
    """The training state saved with a checkpoint; the optimizer state goes into ``optimizer``
    (``model`` is needed when it was saved by parameter name, from a sharded run).

    The random generators continue as worker ``rank`` left them when the checkpoint holds every
    worker's state and the run has as many workers as the one that saved it; otherwise rank 0
    takes the saving process's state and the other ranks keep their own seeding (taking rank
    0's would give every rank the same dropout masks)."""
    blob = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None:
        from pipeline.train.sharding import is_sharded, load_full_optimizer_state

        if blob.get("optimizer_by_name") is not None:
            if model is None:
                raise ValueError(f"{path}: the optimizer state is saved by parameter name; pass the model")
            load_full_optimizer_state(model, optimizer, blob["optimizer_by_name"])
        elif blob["optimizer"] is not None:
            if model is not None and is_sharded(model):
                raise ValueError(f"{path} was saved by a ddp run: continue it with scaling.strategy ddp")
            optimizer.load_state_dict(blob["optimizer"])
    names = {f.name for f in fields(TrainState)}
    state = TrainState(**{k: v for k, v in (blob["state"] or {}).items() if k in names})
    by_rank = blob.get("rng_by_rank")
    if by_rank and len(by_rank) != world_size and rank == 0:
        logger.warning(
            "%s was saved by a run of %d workers and this run has %d: the weights, optimizer, schedule and step "
            "continue, but the position in the epoch does not carry over exactly (each worker skips the first %d "
            "batches of its own, now different, share of the data, so rows of epoch %d may be read twice or not at "
            "all) and ranks other than 0 restart their random streams; resume with scaling.num_workers=%d to "
            "continue exactly", path, len(by_rank), world_size, state.batches_in_epoch, state.epoch, len(by_rank))
    rng = by_rank[rank] if by_rank and len(by_rank) == world_size else blob.get("rng") if rank == 0 else None
    if rng:
        set_rng_state(rng)
    return state, blob.get("extra", {})


def load_model_weights(model, path: str | Path) -> None:
    """Load safetensors weights saved by ``save_checkpoint`` into an already built model."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors weights in {path}"
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    target = unwrap(model)
    missing, unexpected = target.load_state_dict(state, strict=False)
    # tied output embeddings are not stored twice
    missing = [m for m in missing if not m.endswith(("lm_head.weight", "decoder.weight", "decoder.bias"))]
    assert not missing and not unexpected, f"checkpoint mismatch: missing {missing}, unexpected {unexpected}"
    if hasattr(target, "tie_weights"):
        target.tie_weights()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
