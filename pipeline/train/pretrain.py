"""Pretraining: a causal (GPT-2 / Llama) or masked LM trained from scratch on the prepare stage's
packed shards with Ray Train, exported in Hugging Face format with a metrics file and loss curves.

``run_pretrain(cfg)`` expects Ray to be initialised (``jobs/pretrain.py`` does it). The run lives
in ``<output_dir>/<name>-<hash>``: rerunning the same config resumes from the latest checkpoint
or, when the run has finished, does nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import check, config_hash, to_dict
from pipeline.model.build import ModelConfig, build_model, flops_per_token, num_params
from pipeline.train.checkpoint import write_json
from pipeline.train.data import LMBatcher, load_manifest, resolve_prepared, shard_paths
from pipeline.train.loop import LoopConfig, OptimConfig
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig, fit

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

    def run_dir(self, manifest: dict) -> Path:
        data = to_dict(self)
        for key in ("output_dir", "name", "scaling", "run"):
            data.pop(key)
        data["data"] = manifest["config_hash"]
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


def run_pretrain(cfg: PretrainConfig) -> dict:
    import ray

    data_dir = resolve_prepared(cfg.data)
    manifest = load_manifest(data_dir)
    seq_len = manifest["tokens"]["seq_len"]
    check(seq_len <= cfg.model.max_seq_len,
          f"model.max_seq_len ({cfg.model.max_seq_len}) is shorter than the data's seq_len ({seq_len})")
    run_dir = cfg.run_dir(manifest)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        logger.info("pretrain: %s is already complete (same config); not recomputing", run_dir)
        return json.loads(summary_path.read_text())
    train_files = shard_paths(data_dir, manifest, "train")
    check(bool(train_files), f"data: {data_dir} has no train shards")
    val_files = shard_paths(data_dir, manifest, "val")
    datasets = {"train": ray.data.read_parquet(train_files)}
    if val_files:
        datasets["val"] = ray.data.read_parquet(val_files)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = str(Path(manifest["tokenizer"]).resolve())
    config = {"model": to_dict(cfg.model), "optim": to_dict(cfg.optim), "loop": to_dict(cfg.train),
              "scaling": to_dict(cfg.scaling), "run": to_dict(cfg.run), "tokenizer_dir": tok_dir, "seq_len": seq_len}
    t0 = time.time()
    result = fit(name="ray", storage_path=str(run_dir), datasets=datasets, setup=setup_lm, config=config,
                 scaling=cfg.scaling, run=cfg.run, metrics_path=str(run_dir / "metrics.jsonl"))
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    assert best is not None, "training reported no checkpoint"
    model_dir = run_dir / "model"
    tmp = run_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with best.as_directory() as ckpt:
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("training_state.pt"))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    plot_losses(metrics, run_dir / "loss_curves.png")
    summary = {
        "run_dir": str(run_dir), "model_dir": str(model_dir), "objective": cfg.model.objective, "arch": cfg.model.arch,
        "steps": out.get("step"), "tokens": out.get("tokens"), "seconds": round(time.time() - t0, 1),
        "best_val_loss": min((e["val_loss"] for e in evals if "val_loss" in e), default=None),
        "final": evals[-1] if evals else None, "config": to_dict(cfg), "data_manifest": str(data_dir / "manifest.json"),
    }
    write_json(summary_path, summary)
    return summary


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval" and "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss")
    if evals:
        ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(model) -> str:
    return f"{type(model).__name__} with {num_params(model) / 1e6:.2f}M parameters"
