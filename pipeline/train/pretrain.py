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

from pipeline.config import check, check_local, check_name, config_hash, to_dict, without_defaults
from pipeline.model.build import ModelConfig, build_model, flops_per_token
from pipeline.stamps import check_inputs
from pipeline.train.data import (LMBatcher, filler_row, load_manifest, prepared_tokenizer_dir, resolve_prepared, shard_paths,
                                 split_rows)
from pipeline.train.loop import LATER_LOOP_KEYS, LoopConfig, OptimConfig
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig, equal_shares, filler_count
from pipeline.train.runner import reused_work, train_and_export

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
    # continued pretraining: start from this model's weights instead of a new model. A model
    # directory (ours, or any local Hugging Face causal or masked LM) or the pretrain / finetune
    # config YAML that exported one; the data must be prepared with its tokenizer (tokenizer.path)
    init_from: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.data), "data must name a prepare output directory")
        check_name(self.name)
        for key in ("output_dir", "data", "init_from"):
            check_local(getattr(self, key), key)
        check(self.run.checkpoint_metric != "val_accuracy", "run.checkpoint_metric val_accuracy applies to "
              "classification fine-tuning only: pretraining reports val_loss (or last: the final checkpoint)")
        if self.init_from is not None:
            given, default = to_dict(self.model), to_dict(ModelConfig())
            changed = [k for k in given if given[k] != default[k] and k != "dropout"]
            check(not changed, f"model.{changed[0] if changed else ''} builds a new model, and init_from starts from "
                               f"{self.init_from}, whose architecture, size and context are its own: leave model.* "
                               f"unset (after a YAML that sets them: model={{}}); model.dropout above 0 replaces "
                               f"the base's dropout")

    def run_dir(self, manifest: dict) -> Path:
        data = to_dict(self)
        for key in ("output_dir", "name", "scaling", "run"):
            data.pop(key)
        data["data"] = manifest["config_hash"]
        if self.init_from is not None:
            data["init_from"] = str(self.base_dir())
        data = without_defaults(data, {"train": LATER_LOOP_KEYS, "init_from": None})
        return Path(self.output_dir).resolve() / f"{self.name}-{config_hash(data)}"

    def base_dir(self) -> Path:
        """The model directory ``init_from`` names (absolute)."""
        from pipeline.finetune.finetune import resolve_model_dir

        return resolve_model_dir(self.init_from)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def setup_lm(config: dict):
    """Per worker: (model, batcher, tokenizer, flops/token). Module-level so Ray can pickle it."""
    from pipeline.config import from_dict

    model_cfg = from_dict(ModelConfig, config["model"])
    tok = _load_tokenizer(config["tokenizer_dir"])
    if config.get("init_from"):
        model = load_base(config["init_from"], config["objective"], model_cfg.dropout)
        if len(tok) > model.get_input_embeddings().num_embeddings:  # the data's tokenizer added tokens
            model.resize_token_embeddings(len(tok))
        objective = config["objective"]
    else:
        model = build_model(model_cfg, len(tok), tok.pad_token_id, tok.eos_token_id, seed=config["loop"]["seed"])
        objective = model_cfg.objective
    batcher = LMBatcher(objective, tok.mask_token_id, len(tok), tok.all_special_ids, seed=config["loop"]["seed"])
    return model, batcher, tok, flops_per_token(model, config["seq_len"])


def load_base(model_dir: str, objective: str, dropout: float = 0.0):
    """The ``init_from`` model, in float32, its dropout set to ``dropout`` where that is above 0."""
    import transformers

    from pipeline.finetune.finetune import dropout_overrides
    from pipeline.model.build import load_pretrained, name_default_loss

    auto = transformers.AutoModelForMaskedLM if objective == "masked" else transformers.AutoModelForCausalLM
    overrides = dropout_overrides(Path(model_dir), dropout) if dropout > 0 else {}
    return name_default_loss(load_pretrained(auto, model_dir, **overrides))


def check_base(cfg: PretrainConfig, data_dir: Path, seq_len: int) -> tuple[Path, str, str]:
    """The ``init_from`` model directory, its objective and its ``model_type``, checked against the
    data: a causal or masked LM (not a classifier), the data's tokenizer, rows that fit its context."""
    import transformers

    from pipeline.model.build import checkpoint_kind, context_length, is_masked_lm
    from pipeline.train.data import check_same_tokenizer

    base = cfg.base_dir()
    check((base / "config.json").is_file(), f"init_from: {base} is not a Hugging Face model directory (no config.json)")
    check(checkpoint_kind(base) != "classifier", f"init_from: {base} is a sequence classifier, not a language model")
    check_same_tokenizer(data_dir, base, "init_from")
    base_config = transformers.AutoConfig.from_pretrained(str(base), local_files_only=True)
    ctx = context_length(base_config, default=seq_len)
    check(seq_len <= ctx, f"init_from: the data's rows (seq_len {seq_len}) are longer than {base}'s context ({ctx}); "
                          f"prepare with pack.seq_len <= {ctx}")
    objective = "masked" if is_masked_lm(base_config) else "causal"
    if objective == "masked":
        tok = _load_tokenizer(str(prepared_tokenizer_dir(data_dir, load_manifest(data_dir))))
        check(tok.mask_token_id is not None, f"init_from: {base} is a masked LM, and the data's tokenizer has no mask "
                                             f"token to train it with")
    return base, objective, base_config.model_type


def check_pretrain(cfg: PretrainConfig) -> tuple[Path, dict, tuple[Path, str, str] | None]:
    """The prepare output's directory and manifest, checked against the config (no cluster
    needed): it exists, its rows fit the model's context, it has train shards; and the
    ``init_from`` base (``check_base``), or None."""
    data_dir = resolve_prepared(cfg.data)
    manifest = load_manifest(data_dir)
    seq_len = manifest["tokens"]["seq_len"]
    base = None
    if cfg.init_from is not None:
        base = check_base(cfg, data_dir, seq_len)
    else:
        check(seq_len <= cfg.model.max_seq_len,
              f"model.max_seq_len ({cfg.model.max_seq_len}) is shorter than the data's seq_len ({seq_len}): raise "
              f"it, or prepare the data with pack.seq_len={cfg.model.max_seq_len} ({data_dir} was packed to {seq_len})")
    if cfg.init_from is None and seq_len < cfg.model.max_seq_len:  # allowed (a context to fine-tune into later), but said
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
    return data_dir, manifest, base


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

    data_dir, manifest, base_info = check_pretrain(cfg)
    seq_len = manifest["tokens"]["seq_len"]
    run_dir = cfg.run_dir(manifest)
    summary_path = run_dir / "summary.json"
    # a base model re-exported to the same path since this run was made: said, not reused in silence
    changed = check_inputs(run_dir, {"init_from": str(base_info[0])} if base_info else {}, "pretrain",
                           reused_work(run_dir), exclude=Path(cfg.output_dir))
    if summary_path.exists():
        logger.info("pretrain: %s is already complete (same config); not recomputing", run_dir)
        return {**json.loads(summary_path.read_text()), "cached": True, **({"inputs_changed": changed} if changed else {})}
    workers = cfg.scaling.num_workers
    rows = {split: split_rows(manifest, split) for split in ("train", "val") if shard_paths(data_dir, manifest, split)}
    datasets = {split: read_parquet(split_files(shard_paths(data_dir, manifest, split), n, workers, seq_len,
                                                run_dir / "fillers", split)) for split, n in rows.items()}
    tok_dir = str(prepared_tokenizer_dir(data_dir, manifest))
    objective, arch, base = cfg.model.objective, cfg.model.arch, None
    if base_info is not None:
        base, objective, arch = base_info
        logger.info("pretrain: continuing the %s %s LM %s on %s", arch, objective, base, data_dir)
    config = {"model": to_dict(cfg.model), "optim": to_dict(cfg.optim), "loop": to_dict(cfg.train),
              "scaling": to_dict(cfg.scaling), "run": to_dict(cfg.run), "tokenizer_dir": tok_dir, "seq_len": seq_len,
              "init_from": str(base) if base else None, "objective": objective}
    extra = {"objective": objective, "arch": arch, "config": to_dict(cfg), **({"init_from": str(base)} if base else {}),
             "data_manifest": str(data_dir / "manifest.json"), "equal_shares": equal_shares(rows, workers)}
    return train_and_export(run_dir, datasets, setup_lm, config, cfg.scaling, cfg.run, "input_ids", extra, callbacks,
                            sweep_trial)
