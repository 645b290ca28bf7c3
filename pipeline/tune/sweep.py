"""Ray Tune sweep over the real training functions: each trial is a full ``run_pretrain`` or
``run_finetune`` (a Ray Train ``TorchTrainer``; the base YAML says which: a finetune config has
a ``task``) whose evaluations reach Tune through ``TuneReportCallback``; ASHA (Li et al. 2020,
"A System for Massively Parallel Hyperparameter Tuning") stops weak trials early on the
validation metric. The best trial is written as a pretrain or finetune YAML that
``jobs.pretrain`` / ``jobs.finetune`` accepts unchanged."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import apply_overrides, check, check_local, check_name, check_seed, config_hash, from_dict, load_yaml, to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """What the trials vary; a hyperparameter left empty keeps the base config's value."""

    lr: list[float] = field(default_factory=list)  # log-uniform [low, high]
    batch_size: list[int] = field(default_factory=list)  # choice
    weight_decay: list[float] = field(default_factory=list)  # choice
    warmup_steps: list[int] = field(default_factory=list)  # choice
    n_layer: list[int] = field(default_factory=list)  # choice
    n_embd: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(not self.lr or (len(self.lr) == 2 and 0 < self.lr[0] < self.lr[1]),
              f"space.lr must be [low, high] with 0 < low < high (or empty: the base config's), got {self.lr}")
        check(any(getattr(self, f.name) for f in dataclasses.fields(self)),
              f"space: name at least one hyperparameter to sweep ({', '.join(f.name for f in dataclasses.fields(self))})")

    def swept(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]

    def choices(self) -> list[dict]:
        """Samples to check before the sweep: each value of each hyperparameter alone (lr at both
        ends of its range), and every depth x width pair (they interact with the head count)."""
        import itertools

        out = [{k: v} for k in self.swept() if k not in ("n_layer", "n_embd") for v in getattr(self, k)]
        dims = [k for k in ("n_layer", "n_embd") if getattr(self, k)]
        return out + [dict(zip(dims, c)) for c in itertools.product(*(getattr(self, k) for k in dims))] if dims else out


def default_space() -> SearchSpace:
    """The sweep when a config has no ``space`` section."""
    return SearchSpace(lr=[1e-4, 3e-3], batch_size=[4, 8], weight_decay=[0.0, 0.1], warmup_steps=[5, 20])


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    base: str  # the pretrain or finetune config YAML every trial starts from
    overrides: list[str] = field(default_factory=list)  # key=value applied to base for every trial
    output_dir: str = "outputs/tune"
    name: str = "tune"
    space: SearchSpace = field(default_factory=default_space)  # a given space sweeps only the keys it names
    num_samples: int = 4
    max_steps: int = 40  # per trial
    eval_every: int = 10  # one Tune iteration per evaluation
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: as many trials as the cluster's CPUs hold
    seed: int = 0
    # what ASHA and the choice of the best trial compare: val_loss (lowest) or, for a
    # classification fine-tune, val_accuracy (highest)
    metric: str = "val_loss"

    def __post_init__(self) -> None:
        check(self.metric in METRICS, f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        check_name(self.name)
        check_local(self.output_dir, "output_dir")
        check(self.max_steps >= self.eval_every >= 1, f"max_steps ({self.max_steps}) must be >= eval_every ({self.eval_every}) >= 1")
        check(self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}")
        evaluations = -(-self.max_steps // self.eval_every)  # ASHA's max_t
        check(1 <= self.grace_period <= evaluations, f"grace_period must be in [1, evaluations per trial = "
                                                     f"{evaluations}], got {self.grace_period}")
        check(self.max_concurrent is None or self.max_concurrent >= 1,
              f"max_concurrent must be >= 1 or null, got {self.max_concurrent}")
        check_seed(self.seed, "seed")


METRICS = {"val_loss": "min", "val_accuracy": "max"}


def is_finetune(base: dict) -> bool:
    """A finetune config names its ``task``; a pretrain config does not."""
    return "task" in base


def trial_overrides(sample: dict) -> list[str]:
    """Sampled values -> the pretrain ``key=value`` overrides they stand for."""
    mapping = {"lr": "optim.lr", "batch_size": "train.batch_size", "weight_decay": "optim.weight_decay",
               "warmup_steps": "optim.warmup_steps", "n_layer": "model.n_layer", "n_embd": "model.n_embd"}
    return [f"{mapping[k]}={v}" for k, v in sorted(sample.items()) if k in mapping]


def _actor_dead(actor_id: str) -> bool:
    import ray

    # GCS actor table (ray.util.state would need the dashboard, the very thing missing)
    return (ray._private.state.actors(actor_id) or {}).get("State", "DEAD") == "DEAD"


def _live_groups() -> dict[str, str]:
    """Placement groups not removed -> the id of the actor that created them (GCS table)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_placement_group_table()]
    return {d.placement_group_id.hex(): d.creator_actor_id.hex() for d in table
            if d.state != gcs_pb2.PlacementGroupTableData.REMOVED}


def _remove_group(group: str) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))


def release_train_placement_groups_callback():
    """A Tune callback that removes the Ray Train placement groups a stopped trial leaves behind.

    When Tune stops a trial (ASHA, or ``max_t`` reached) the trial's actor exits and takes the
    TorchTrainer's controller with it, before the controller removes its workers' placement
    group (a group an actor creates lives as long as the job, not the actor). Worse, the
    controller may see its worker die first and, within its ``max_failures``, ask for a new group
    for a replacement just before it dies itself (seen in CI: the sweep's test passed, and the
    next training run waited forever for the CPUs of that empty group); that request can reach
    the GCS after the controller is already dead (seen in a later CI run: 130 ms after its other
    groups were removed). Ray Train's own ``PlacementGroupCleaner`` notices a dead controller
    through the state API, which only answers on clusters that run the dashboard; elsewhere the
    groups keep their CPUs.

    The workers report their group's id with every result; the group's creator, from the GCS
    placement-group table, is the trial's Train controller. Once a trial has ended and its
    controller is dead (a live controller is never disturbed: it releases its own groups), every
    group that controller created is removed, and for ``grace_s`` afterwards so is any group
    that turns up created by it (a dead actor owns nothing that anyone can use)."""
    from ray import tune

    class ReleaseTrainPlacementGroups(tune.Callback):
        grace_s = 30.0  # how long a dead controller's late group requests are watched for
        interval_s = 1.0  # at most one look at the GCS table per interval while there is work

        def __init__(self) -> None:
            self.running: dict[str, str] = {}  # trial id -> its first reported placement group id
            self.ended: dict[str, str] = {}  # trial id -> the group id, trial ended
            self.controllers: dict[str, str] = {}  # trial id -> its controller's actor id (once known)
            self.dead: dict[str, float] = {}  # dead controller id -> when it was found dead
            self.last = 0.0

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            pg_hex = result.get("placement_group_id")
            if pg_hex and trial.trial_id not in self.running:
                self.running[trial.trial_id] = pg_hex
                try:  # the group's creator is the trial's Train controller
                    self.controllers[trial.trial_id] = _live_groups().get(pg_hex, "")
                except Exception as e:  # the GCS table is unavailable: the reported group alone is released
                    logger.debug("placement group table: %s", e)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if trial.trial_id in self.running:
                self.ended[trial.trial_id] = self.running.pop(trial.trial_id)

        on_trial_error = on_trial_complete

        def on_step_begin(self, iteration, trials, **info) -> None:
            if (self.ended or self.dead) and time.monotonic() - self.last >= self.interval_s:
                self._release()

        def on_experiment_end(self, trials, **info) -> None:
            # the last trials stopped may still be shutting down: wait for their controllers
            # (bounded), then for the late requests of the dead ones, so that no group keeps
            # CPUs from what runs after the sweep
            deadline = time.monotonic() + 60
            while self.ended and time.monotonic() < deadline:
                self._release()
                if self.ended:
                    time.sleep(0.5)
            if self.dead:
                time.sleep(max(0.0, min(2.0, max(self.dead.values()) + 2.0 - time.monotonic())))
                self._release()
            if self.ended:
                logger.warning("tune: the Train controllers of trials %s are still alive after the sweep; their "
                               "placement groups are left to them", sorted(self.ended))

        def _release(self) -> None:
            self.last = now = time.monotonic()
            self.dead = {c: t for c, t in self.dead.items() if now - t < self.grace_s}
            try:
                groups = _live_groups()
            except Exception as e:  # the GCS table is unavailable: try again at the next step
                logger.debug("placement group table: %s", e)
                return
            doomed: dict[str, str] = {}  # group -> the trial (or controller) it is released for
            for trial_id, pg_hex in list(self.ended.items()):
                controller = self.controllers.get(trial_id) or groups.get(pg_hex, "")
                if controller and not _actor_dead(controller):
                    continue
                if controller:
                    self.dead[controller] = now
                if pg_hex in groups:
                    doomed[pg_hex] = f"trial {trial_id}"
                del self.ended[trial_id]
            doomed.update({g: f"the dead Train controller {c}" for g, c in groups.items() if c in self.dead})
            for group, whose in doomed.items():
                try:
                    _remove_group(group)
                    logger.info("released Ray Train placement group %s left by %s", group, whose)
                except Exception as e:  # removed meanwhile: nothing to do
                    logger.debug("placement group %s (%s): %s", group, whose, e)

    return ReleaseTrainPlacementGroups()


def run_trial(config: dict) -> None:
    """A Tune trainable: the config dict becomes a PretrainConfig or FinetuneConfig on the first line."""
    from ray.tune.integration.ray_train import TuneReportCallback

    data = apply_overrides(config["base"], trial_overrides(config["sample"]))
    if is_finetune(data):
        from pipeline.finetune.finetune import FinetuneConfig, run_finetune

        summary = run_finetune(from_dict(FinetuneConfig, data), callbacks=[TuneReportCallback()], sweep_trial=True)
    else:
        from pipeline.train.pretrain import PretrainConfig, run_pretrain

        summary = run_pretrain(from_dict(PretrainConfig, data), callbacks=[TuneReportCallback()], sweep_trial=True)
    if summary.get("cached"):
        # the same trial finished in an earlier sweep: no training ran, so report its final evaluation
        from ray import tune

        tune.report({k: v for k, v in (summary.get("final") or {}).items() if k != "kind"})


def trial_base(cfg: TuneConfig, base: dict, out: Path):
    """The trials' training config (the base YAML with the sweep's overrides), as a dict and typed
    (a PretrainConfig or a FinetuneConfig). Paths are made absolute where the job runs: trials
    run in their own working directories."""
    base = apply_overrides(base, [*cfg.overrides, f"train.max_steps={cfg.max_steps}", f"train.eval_every={cfg.eval_every}",
                                  "train.early_stopping_patience=null", f"output_dir={out / 'trials'}"])
    from pipeline.train.data import resolve_prepared

    if is_finetune(base):
        from pipeline.finetune.finetune import FinetuneConfig, resolve_model_dir

        check(not (cfg.space.n_layer or cfg.space.n_embd),
              "space.n_layer / space.n_embd: a fine-tune keeps its base model's architecture; leave them empty")
        if base.get("task") != "classification":
            check(cfg.metric == "val_loss", f"metric {cfg.metric}: only a classification fine-tune reports it")
        if isinstance(base.get("base_model"), str):
            base["base_model"] = str(resolve_model_dir(base["base_model"]))
        data = base.get("data") if isinstance(base.get("data"), dict) else {}
        for key in ("train", "val", "test"):  # a prepare YAML, a directory or file, or "chatterbot"
            value = data.get(key)
            if isinstance(value, str) and value.endswith((".yaml", ".yml")):
                data[key] = str(resolve_prepared(value).resolve())
            elif isinstance(value, str) and Path(value).exists():
                data[key] = str(Path(value).resolve())
        return base, from_dict(FinetuneConfig, base)
    from pipeline.train.pretrain import PretrainConfig

    check(cfg.metric == "val_loss", f"metric {cfg.metric}: pretraining reports val_loss only")
    if isinstance(base.get("init_from"), str) and base["init_from"]:  # a model directory or the YAML that made one
        from pipeline.finetune.finetune import resolve_model_dir

        base["init_from"] = str(resolve_model_dir(base["init_from"]))
    if isinstance(base.get("data"), str):
        base["data"] = str(Path(resolve_prepared(base["data"])).resolve())
        from pipeline.train.data import load_manifest, shard_paths

        if Path(base["data"], "manifest.json").is_file():  # (a missing one is check_pretrain's error)
            check(bool(shard_paths(base["data"], load_manifest(base["data"]), "val")),
                  f"tune ranks trials by validation loss: {base['data']} has no val shards "
                  f"(prepare it with split.val_fraction > 0)")
    return base, from_dict(PretrainConfig, base)


def check_tune(cfg: TuneConfig) -> None:
    """The trials' config is valid and its data and base model are there (no cluster needed)."""
    from pipeline.finetune.finetune import check_finetune
    from pipeline.train.pretrain import check_pretrain

    data, typed = trial_base(cfg, load_yaml(cfg.base), Path(cfg.output_dir).resolve())
    if is_finetune(data):
        check_finetune(typed)
    else:
        check_pretrain(typed)
    cls = type(typed)
    for sample in cfg.space.choices():  # e.g. a width the head count does not divide, a batch larger than the data
        try:
            trial = from_dict(cls, apply_overrides(data, trial_overrides(sample)))
            if not is_finetune(data):
                check_pretrain(trial)
        except ValueError as e:
            raise ValueError(f"space: the trial {sample} would fail: {e}") from None


def run_tune(cfg: TuneConfig) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = load_yaml(cfg.base)
    out = Path(cfg.output_dir).resolve() / f"{cfg.name}-{config_hash({**to_dict(cfg), 'base': base, 'output_dir': None})}"
    if (out / "summary.json").exists():
        logger.info("tune: %s is already complete (same config); not recomputing", out)
        return json.loads((out / "summary.json").read_text())
    base, base_cfg = trial_base(cfg, base, out)
    space = {k: tune.loguniform(*cfg.space.lr) if k == "lr" else tune.choice(getattr(cfg.space, k))
             for k in cfg.space.swept()}
    per_trial_cpus = base_cfg.scaling.num_workers * base_cfg.scaling.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 1)
    # Ray Data's read tasks need one whole CPU beside every trial's workers; concurrent trials
    # share that CPU (their reads are short), so as many trials as fit in the rest run at once
    concurrency = cfg.max_concurrent or max(1, int((cpus - 1) // (per_trial_cpus + 0.01)))
    if base_cfg.scaling.use_gpu:  # one GPU per worker: no more trials at once than the GPUs hold
        gpus = int(ray.cluster_resources().get("GPU", 0))
        check(gpus >= base_cfg.scaling.num_workers, f"tune: a trial needs {base_cfg.scaling.num_workers} GPUs "
                                                    f"(scaling.use_gpu, one per worker); the cluster has {gpus}")
        concurrency = min(concurrency, gpus // base_cfg.scaling.num_workers)
    check(cpus - concurrency * (per_trial_cpus + 0.01) >= 1,
          f"tune: {cpus} CPUs cannot hold a trial ({per_trial_cpus} CPUs of workers + 0.01 for the trial) and "
          f"one free CPU for its data ingestion; lower scaling.cpus_per_worker or scaling.num_workers in {cfg.base}, "
          f"or in the sweep's own overrides (e.g. overrides: [scaling.num_workers=1, scaling.cpus_per_worker=0.45])")
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=math.ceil(cfg.max_steps / cfg.eval_every),
                              grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor)
    tuner = tune.Tuner(
        # The trial driver only waits on its TorchTrainer and reserves almost nothing. Ray Data's
        # read tasks need one whole free CPU beside trial + workers (see the concurrency rule).
        tune.with_resources(run_trial, {"CPU": 0.01}),
        param_space={"base": base, "sample": space},
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=METRICS[cfg.metric], scheduler=scheduler,
                                    num_samples=cfg.num_samples,
                                    search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency)),
        run_config=tune.RunConfig(name="tune", storage_path=str(out),
                                  callbacks=[release_train_placement_groups_callback()]),
    )
    grid = tuner.fit()
    rows = []
    for r in grid:
        history = r.metrics_dataframe
        rows.append({"trial": r.path.rsplit("/", 1)[-1] if r.path else "?", **r.config["sample"],
                     "val_loss": (r.metrics or {}).get("val_loss"),
                     **({cfg.metric: (r.metrics or {}).get(cfg.metric)} if cfg.metric != "val_loss" else {}),
                     "iterations": (r.metrics or {}).get("training_iteration"),
                     "step": (r.metrics or {}).get("step"),
                     "error": str(r.error)[:200] if r.error else None,
                     "curve": [] if history is None or cfg.metric not in history else
                     list(zip(history["step"].tolist(), history[cfg.metric].tolist()))})
    ok = [r for r in rows if r[cfg.metric] is not None and not r["error"]]
    check(bool(ok), f"tune: every trial failed: {[r['error'] for r in rows]}")
    best = (min if METRICS[cfg.metric] == "min" else max)(ok, key=lambda r: r[cfg.metric])
    best_yaml = apply_overrides(load_yaml(cfg.base), [*cfg.overrides, *trial_overrides(best)])
    best_path = out / f"best_{'finetune' if is_finetune(best_yaml) else 'pretrain'}.yaml"
    best_path.write_text(yaml.safe_dump(best_yaml, sort_keys=False))
    _write_table(rows, out, cfg.metric)
    summary = {"output_dir": str(out), "best": {k: v for k, v in best.items() if k != "curve"},
               "best_config": str(best_path), "num_trials": len(rows),
               # by the last training step reached (a trial finished in an earlier run reports only once)
               "stopped_early": sum(1 for r in ok if (r["step"] or 0) < cfg.max_steps), "concurrency": concurrency,
               "trials": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _write_table(rows: list[dict], out: Path, metric: str = "val_loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k not in ("curve",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    sign = 1 if METRICS[metric] == "min" else -1
    for r in sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0))):
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-", label=" ".join(f"{k}={r[k]:.1e}" if k == "lr" else f"{k}={r[k]}"
                                                 for k in SearchSpace.__dataclass_fields__ if k in r))
    ax.set_xlabel("step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trials.png", dpi=100)
    plt.close(fig)
