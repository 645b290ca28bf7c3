"""Pretraining: a causal (GPT-2 / Llama) or masked LM trained from scratch on the prepare stage's
packed shards with Ray Train, exported in Hugging Face format with a metrics file and loss curves.

``run_pretrain(cfg)`` expects Ray to be initialised (``jobs/pretrain.py`` does it). The run lives
in ``<output_dir>/<name>-<hash>``: rerunning the same config resumes from the latest checkpoint
or, when the run has finished, does nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import check, check_name, config_hash, to_dict, without_defaults
from pipeline.model.build import ModelConfig, build_model, flops_per_token
from pipeline.train.data import (LMBatcher, filler_row, load_manifest, prepared_tokenizer_dir, resolve_prepared, shard_paths,
                                 split_rows)
from pipeline.train.loop import LATER_LOOP_KEYS, LoopConfig, OptimConfig
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig, equal_shares, filler_count
from pipeline.train.runner import train_and_export

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    data: str  # a finished prepare output directory, or the prepare config YAML that made it
    output_dir: str = "outputs/pretrain"
    name: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfigCfg = field(default_factory=RunConfigCfg)

    def __post_init__(self) -> None:
        check(bool(self.data), "data must name a prepare output directory")
        check_name(self.name)
        check(self.run.checkpoint_metric != "val_accuracy", "run.checkpoint_metric val_accuracy applies to "
              "classification fine-tuning only: pretraining reports val_loss (or last: the final checkpoint)")

    def run_dir(self, manifest: dict) -> Path:
        data = to_dict(self)
        for key in ("output_dir", "name", "scaling", "run"):
            data.pop(key)
        data["data"] = manifest["config_hash"]
        data = without_defaults(data, {"train": LATER_LOOP_KEYS})
        return Path(self.output_dir).resolve() / f"{self.name}-{config_hash(data)}"


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def setup_lm(config: dict):
    """Per worker: (model, batcher, tokenizer, flops/token). Module-level so Ray can pickle it."""
    from pipeline.config import from_dict

    model_cfg = from_dict(ModelConfig, config["model"])
    tok = _load_tokenizer(config["tokenizer_dir"])
    model = build_model(model_cfg, len(tok), tok.pad_token_id, tok.eos_token_id, seed=config["loop"]["seed"])
    batcher = LMBatcher(model_cfg.objective, tok.mask_token_id, len(tok), tok.all_special_ids, seed=config["loop"]["seed"])
    return model, batcher, tok, flops_per_token(model, config["seq_len"])


def check_pretrain(cfg: PretrainConfig) -> tuple[Path, dict]:
    """The prepare output's directory and manifest, checked against the config (no cluster
    needed): it exists, its rows fit the model's context, it has train shards."""
    data_dir = resolve_prepared(cfg.data)
    manifest = load_manifest(data_dir)
    seq_len = manifest["tokens"]["seq_len"]
    check(seq_len <= cfg.model.max_seq_len,
          f"model.max_seq_len ({cfg.model.max_seq_len}) is shorter than the data's seq_len ({seq_len})")
    if seq_len < cfg.model.max_seq_len:  # allowed (a context to fine-tune into later), but said
        logger.warning("model.max_seq_len (%d) is longer than the data's rows (seq_len %d): positions from %d on are "
                       "never trained, so the model reads text past %d tokens with %s", cfg.model.max_seq_len, seq_len,
                       seq_len, seq_len, "untrained position embeddings" if cfg.model.arch == "gpt2" or
                       cfg.model.objective == "masked" else "relative distances it never saw")
    check(bool(shard_paths(data_dir, manifest, "train")), f"data: {data_dir} has no train shards")
    rows = split_rows(manifest, "train")
    check(rows >= 1, f"data: the train split of {data_dir} holds no row")
    share = -(-rows // cfg.scaling.num_workers)
    if share < cfg.train.batch_size:  # every epoch keeps its last, partial batch: each step is a whole share
        logger.info("data: the train split holds %d rows of %d tokens, %d per worker, fewer than train.batch_size "
                    "(%d): every step trains on a worker's whole share (one epoch)", rows, seq_len, share,
                    cfg.train.batch_size)
    return data_dir, manifest


def split_files(files: list[str], rows: int, workers: int, seq_len: int, filler_dir: Path, split: str) -> list[str]:
    """A split's shard files and, when its rows do not divide among ``workers``, a file of filler
    rows (no loss; ``filler_count``) written to ``filler_dir``. One read of all the files keeps
    their order (a union of datasets does not), so every run gives each worker the same rows."""
    fill = filler_count(rows, workers)
    if not fill:
        return files
    import pyarrow as pa
    import pyarrow.parquet as pq

    filler_dir.mkdir(parents=True, exist_ok=True)
    path = filler_dir / f"{split}.parquet"
    schema = pa.schema([pq.read_schema(files[0]).field("input_ids")])
    pq.write_table(pa.Table.from_pylist([filler_row({"input_ids": [0] * seq_len})] * fill, schema=schema), path)
    return [*files, str(path)]


def run_pretrain(cfg: PretrainConfig, callbacks: list | None = None, sweep_trial: bool = False) -> dict:
    from pipeline.ray_utils import read_parquet

    data_dir, manifest = check_pretrain(cfg)
    seq_len = manifest["tokens"]["seq_len"]
    run_dir = cfg.run_dir(manifest)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        logger.info("pretrain: %s is already complete (same config); not recomputing", run_dir)
        return {**json.loads(summary_path.read_text()), "cached": True}
    workers = cfg.scaling.num_workers
    rows = {split: split_rows(manifest, split) for split in ("train", "val") if shard_paths(data_dir, manifest, split)}
    datasets = {split: read_parquet(split_files(shard_paths(data_dir, manifest, split), n, workers, seq_len,
                                                run_dir / "fillers", split)) for split, n in rows.items()}
    tok_dir = str(prepared_tokenizer_dir(data_dir, manifest))
    config = {"model": to_dict(cfg.model), "optim": to_dict(cfg.optim), "loop": to_dict(cfg.train),
              "scaling": to_dict(cfg.scaling), "run": to_dict(cfg.run), "tokenizer_dir": tok_dir, "seq_len": seq_len}
    extra = {"objective": cfg.model.objective, "arch": cfg.model.arch, "config": to_dict(cfg),
             "data_manifest": str(data_dir / "manifest.json"), "equal_shares": equal_shares(rows, workers)}
    return train_and_export(run_dir, datasets, setup_lm, config, cfg.scaling, cfg.run, "input_ids", extra, callbacks,
                            sweep_trial)
