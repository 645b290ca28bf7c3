"""Run a Ray Train job and export its best checkpoint: shared by pretraining and fine-tuning, so
there is one training loop and one export path."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from pipeline.train.checkpoint import write_json
from pipeline.train.ray_train import RunConfigCfg, ScalingConfig, fit
from pipeline.train.schedule import schedule_warning

logger = logging.getLogger(__name__)


def validation_warning(datasets: dict, loop: dict) -> str | None:
    """What a run without a validation split does not do, said before it starts (None with one)."""
    if "val" in datasets:
        return None
    patience = loop.get("early_stopping_patience")
    return ("no validation split: no validation loss or perplexity is reported, the checkpoints kept are the latest "
            "ones and the last is exported" + (f"; train.early_stopping_patience ({patience}) has no effect"
                                               if patience else ""))


def reused_work(run_dir: Path) -> str | None:
    """What a rerun of a training run reuses (``pipeline.stamps``): its finished result, its latest
    checkpoint (Ray Train's storage ``run_dir/ray``, as ``train_and_export`` sets it), or nothing."""
    from pipeline.stamps import CHECKPOINT, FINISHED

    if (run_dir / "summary.json").exists():
        return FINISHED
    return CHECKPOINT if any(run_dir.glob("ray/checkpoint_*/trainer_state.json")) else None


def train_and_export(run_dir: Path, datasets: dict, setup: Callable, config: dict, scaling: ScalingConfig,
                     run: RunConfigCfg, column: str | None, extra: dict, callbacks: list | None = None,
                     sweep_trial: bool = False) -> dict:
    """Fit (resuming when ``run_dir`` holds an earlier attempt), copy the best checkpoint to
    ``run_dir/model`` (a plain Hugging Face model directory), plot losses, write summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    warning = schedule_warning(lr=config["optim"]["lr"], warmup_steps=config["optim"]["warmup_steps"],
                               max_steps=config["loop"]["max_steps"])
    for warning in (warning, validation_warning(datasets, config["loop"])):
        if warning:
            logger.warning(warning)
    t0 = time.time()
    result = fit(name="ray", storage_path=str(run_dir), datasets=datasets, setup=setup, config=config,
                 scaling=scaling, run=run, metrics_path=str(run_dir / "metrics.jsonl"), column=column,
                 callbacks=callbacks, sweep_trial=sweep_trial)
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    best, best_metrics = best_checkpoint(result.best_checkpoints, run.checkpoint_metric) if result.best_checkpoints \
        else (result.checkpoint, result.metrics)
    assert best is not None, "training reported no checkpoint"
    model_dir, tmp = run_dir / "model", run_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with best.as_directory() as ckpt:
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("training_state.pt", "trainer_state.json"))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["kind"] == "eval"]
    plot_losses(metrics, run_dir / "loss_curves.png")
    summary = {
        "run_dir": str(run_dir), "model_dir": str(model_dir), "steps": out.get("step"), "tokens": out.get("tokens"),
        "seconds": round(time.time() - t0, 1),
        "best_val_loss": min((e["val_loss"] for e in evals if "val_loss" in e), default=None),
        "final": evals[-1] if evals else None,
        "exported": {k: v for k, v in (best_metrics or {}).items()
                     if k in ("step", "epoch", "val_loss", "val_ppl", "val_accuracy")},  # what model/ holds
        **extra,
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def best_checkpoint(kept: list[tuple], metric: str | None) -> tuple:
    """The (checkpoint, metrics) pair with the best ``metric`` (val_loss, lowest, by default; val_accuracy,
    highest; "last": the latest step) among those Ray kept. Ray's ``Result.best_checkpoints`` is
    ordered worst first, so its first entry is not the best one; the latest wins a tie."""
    if metric == "last":
        return max(enumerate(kept), key=lambda t: ((t[1][1] or {}).get("step", 0), t[0]))[1]
    metric = metric or "val_loss"
    sign = 1.0 if metric == "val_accuracy" else -1.0
    scored = [(i, c, m) for i, (c, m) in enumerate(kept) if (m or {}).get(metric) is not None]
    if not scored:
        return kept[-1]
    _, c, m = max(scored, key=lambda t: (sign * t[2][metric], t[2].get("step", 0), t[0]))
    return c, m


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
