"""Ray Train wiring: the per-worker function (dataset shard, ``prepare_model``, resume from
``get_checkpoint``, ``report`` with HF-format checkpoints) and the ``TorchTrainer`` around it.
The training itself is ``pipeline.train.loop.Trainer``; nothing here computes a loss."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from pipeline.config import check
from pipeline.model.build import quiet_loading
from pipeline.train.checkpoint import (checkpoint_step, latest_checkpoint, load_model_weights, load_training_state,
                                       rng_state, save_checkpoint)
from pipeline.train.data import ValidationCache, stream_seed
from pipeline.train.loop import LoopConfig, OptimConfig, TrainState, Trainer, autocast_context
from pipeline.train.sharding import full_state, shard_model

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU (NVIDIA datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    # CPUs reserved per worker. Ray Data's read tasks need free CPUs too: if the workers reserve
    # every CPU of the cluster, ingestion waits forever. On 2 CPUs use 2 workers x 0.5.
    cpus_per_worker: float = 0.5
    threads_per_worker: int | None = None  # torch intra-op threads; default: max(1, cpus_per_worker)
    # fsdp: parameters, gradients and optimizer state sharded over the workers (torch FSDP2, one
    # unit per transformer block; CPU or GPU); checkpoints are still full Hugging Face directories
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # DDP gradient bucket size. null: torch's 25 MB on GPU, where all-reduce overlaps backward; on CPU
    # the collective competes with backward for the same cores, so one bucket after backward is
    # faster (+4% measured on 2 cores, benchmarks/bench_train.py).
    ddp_bucket_cap_mb: float | None = None

    def __post_init__(self) -> None:
        check(self.ddp_bucket_cap_mb is None or self.ddp_bucket_cap_mb > 0,
              f"scaling.ddp_bucket_cap_mb must be > 0 or null, got {self.ddp_bucket_cap_mb}")
        check(self.num_workers >= 1, f"scaling.num_workers must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker > 0, f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        check(self.threads_per_worker is None or self.threads_per_worker >= 1,
              f"scaling.threads_per_worker must be >= 1, got {self.threads_per_worker}")


@dataclass(frozen=True, kw_only=True)
class RunConfigCfg:
    num_to_keep: int = 2  # checkpoints kept (best by val loss)
    max_failures: int = 2  # worker failures tolerated (-1: any number); training resumes from the latest checkpoint
    fail_at_step: int | None = None  # fault injection for tests: rank 1 dies once at this step
    # the validation metric that ranks checkpoints (the best one is exported). null: val_loss, or
    # val_accuracy for classification, where the loss of a small validation split keeps rising on
    # over-confident but still correct predictions long after accuracy stopped improving. "last":
    # the final checkpoint (the schedule's end, or where early stopping ended the run), for a
    # validation split too small to rank checkpoints by (BENCHMARKS.md, the demo classifier).
    checkpoint_metric: Literal["val_loss", "val_accuracy", "last"] | None = None

    def __post_init__(self) -> None:
        check(self.num_to_keep >= 1, f"run.num_to_keep must be >= 1, got {self.num_to_keep}")
        check(self.max_failures >= -1, f"run.max_failures must be >= -1, got {self.max_failures}")
        check(self.fail_at_step is None or self.fail_at_step >= 1,
              f"run.fail_at_step must be >= 1 or null, got {self.fail_at_step}")


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


def filler_count(rows: int, workers: int) -> int:
    """Filler rows (``pipeline.train.data.filler_row``: no loss) that make ``rows`` divide among
    ``workers``. Ray Train gives every worker an equal share of a split and leaves out the
    remainder: with the fillers, that remainder is zero and every real row is read."""
    return -rows % workers


def equal_shares(rows: dict[str, int], workers: int) -> dict[str, dict[str, int]]:
    """Each split's rows, the share of every worker (fillers included) and the fillers added.
    Logged, and recorded in the run's summary."""
    shares = {}
    for split, n in rows.items():
        fill = filler_count(n, workers)
        shares[split] = {"rows": n, "per_worker": (n + fill) // workers, "filler_rows": fill}
        if fill:
            logger.info("%s split: %d rows for %d workers; %d filler row(s) without loss make the shares equal "
                        "(%d each), so that every row is read", split, n, workers, fill, (n + fill) // workers)
    return shares


def shard_batches(shard, loop: LoopConfig, column: str | None, make: Callable, epoch: int | None = None):
    """A worker's batches of its dataset shard: an epoch of training batches (shuffled by a local
    buffer seeded by ``epoch``), or with ``epoch`` None the validation batches, in order.

    Every row of the shard is yielded, the last batch partial: no row is skipped in an epoch.
    Ray's equal split gives every rank the same number of rows (the splits hold filler rows that
    make them divide: ``filler_count``), so every rank runs the same number of steps (DDP
    all-reduces, FSDP gathers in each one) and the same number of evaluation forwards."""
    shuffle = {"local_shuffle_buffer_size": loop.shuffle_buffer, "local_shuffle_seed": loop.seed + epoch} \
        if epoch is not None and loop.shuffle_buffer else {}
    for b in shard.iter_torch_batches(batch_size=loop.batch_size, dtypes=torch.long, drop_last=False, **shuffle):
        yield make(b[column]) if column else make(b)


def resume_from(registered, root: str) -> str | None:
    """The checkpoint directory a (re)started worker group continues from: the newer of the one
    Ray hands back (``registered``, the latest its controller registered) and the newest complete
    one under ``root`` (the run's storage). Ray registers a reported checkpoint when its
    controller next polls the workers, so one reported just before a worker died can be on
    storage yet not handed back (the replacement group then started over from step 0); and a
    rerun of a run that ended in an error gets none from Ray at all."""
    on_disk = latest_checkpoint(root)
    if registered is None:
        return str(on_disk) if on_disk else None
    if on_disk is not None and checkpoint_step(on_disk) > (checkpoint_step(registered.path) or -1):
        return str(on_disk)
    return registered.path


def train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker. ``config`` holds plain data only (see ``fit``)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from ray.util import get_current_placement_group

    from pipeline.config import from_dict

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_loading()
    setup = config["setup"]  # a picklable callable building (model, batcher, tokenizer) from config
    optim = from_dict(OptimConfig, config["optim"])
    loop = from_dict(LoopConfig, config["loop"])
    scaling = from_dict(ScalingConfig, config["scaling"])
    run = from_dict(RunConfigCfg, config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(scaling.threads_per_worker or max(1, int(scaling.cpus_per_worker)))
    # the model is initialised from loop.seed, the same weights on every rank (FSDP shards them
    # without a broadcast); then each rank draws its own dropout masks
    model, batcher, tokenizer, flops_per_token = setup(config)
    torch.manual_seed(stream_seed(loop.seed, rank))
    state = TrainState()
    resume = resume_from(ray.train.get_checkpoint(), config["checkpoint_root"])
    if world > 1:  # every rank continues from the same one: rank 0's choice
        chosen = [resume]
        torch.distributed.broadcast_object_list(chosen, src=0)
        resume = chosen[0]
    checkpoint = Checkpoint.from_directory(resume) if resume else None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            load_model_weights(model, ckpt_dir)
    sharded = scaling.strategy == "fsdp" and world > 1
    if sharded:
        model = shard_model(model, ray.train.torch.get_device())
    else:
        ddp_kwargs = {}
        if world > 1:
            bucket = scaling.ddp_bucket_cap_mb
            if bucket is None and not scaling.use_gpu:
                bucket = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
            ddp_kwargs = {"gradient_as_bucket_view": True, **({"bucket_cap_mb": bucket} if bucket else {})}
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs or None)
    if loop.compile:
        model = torch.compile(model)
    device = ray.train.torch.get_device()
    trainer = Trainer(model, optim, loop, device, flops_per_token, peak_flops(device))
    if rank == 0:
        amp = isinstance(autocast_context(device, loop.precision), torch.autocast)
        logger.info("training on %s (%d workers), precision %s: %s", device, world, loop.precision,
                    "bf16 autocast" if amp else "fp32")
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state, extra = load_training_state(ckpt_dir, trainer.optimizer, model, rank, world)
        if trainer.average is not None and extra.get("weight_average"):
            trainer.average.load_state_dict(extra["weight_average"])  # the tail's mean so far
        logger.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch, state.batches_in_epoch)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if "val" in config["datasets"] else None
    column = config["column"]

    def batches(shard, epoch: int | None = None):
        # a masked-LM batcher draws each (rank, epoch)'s masks from a generator of its own, so a
        # resumed run draws the masks the uninterrupted one did; validation (read once, replayed
        # at every evaluation) has its own too
        for_epoch = getattr(batcher, "for_epoch", None)
        return shard_batches(shard, loop, column, for_epoch(epoch, rank) if for_epoch else batcher, epoch)

    val_batches = ValidationCache(lambda: batches(val_shard), loop.eval_batches) if val_shard is not None else None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(t)
        return t

    metrics_path = Path(config["metrics_path"])
    marker = metrics_path.parent / ".fault_injected"

    def on_log(record: dict) -> None:
        if rank == 0:
            logger.info("train %s", json.dumps(record))  # shows in the job's logs on the Ray dashboard
            with metrics_path.open("a") as f:
                f.write(json.dumps({"kind": "train", **record}) + "\n")
        if run.fail_at_step is not None and record["step"] >= run.fail_at_step and rank == min(1, world - 1) \
                and not marker.exists():
            marker.write_text(str(record["step"]))
            os._exit(1)  # a hard worker death, as a preempted node would look

    # The worker group's placement group, reported so that a Tune sweep can release the groups of
    # a trial's controller once Tune has stopped the trial (pipeline.tune.sweep).
    pg = get_current_placement_group()
    pg_id = {"placement_group_id": pg.id.hex()} if pg is not None else {}

    def on_eval(metrics: dict, st: TrainState, is_last: bool) -> None:
        # sharded: every rank takes part in gathering the full weights and optimizer state
        model_state, optim_state = full_state(model, trainer.optimizer) if sharded else (None, None)
        # the tail's running mean, for a resume inside it (gathered from the shards: every rank calls);
        # at the last step the weights are the mean already
        average = trainer.average.state_dict() if trainer.average is not None and trainer.average.count \
            and st.step < loop.max_steps else None
        rngs = [None] * world  # every worker's random streams, to resume each as it was
        if world > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"kind": "eval", **metrics}) + "\n")
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, tokenizer, trainer.optimizer, st,
                                extra={"metrics": metrics, **({"weight_average": average} if average else {})},
                                model_state=model_state, optimizer_state=optim_state, rng_by_rank=rngs)
                ray.train.report({**metrics, **pg_id}, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report({**metrics, **pg_id})

    state = trainer.fit(
        state, lambda epoch: batches(train_shard, epoch),
        val_batches,
        reduce=reduce, on_log=on_log, on_eval=on_eval, world_size=world,
    )
    return {"step": state.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
            "history": state.history if rank == 0 else []}


def ordered_data_config():
    """Ray Train's data config with every split read in file order, so that a rerun gives each
    worker the same rows in the same order (training batches are then shuffled by a seeded local
    buffer): same config, same losses, where Ray Data's unordered delivery made runs differ."""
    import ray.train

    with warnings.catch_warnings():  # Ray's own defaults still set the option it deprecates; nothing for a user to do
        warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")
        ordered = ray.train.DataConfig.default_ingest_options()
    ordered.preserve_order = True
    return ray.train.DataConfig(execution_options=ordered)


def fit(*, name: str, storage_path: str, datasets: dict, setup: Callable, config: dict, scaling: ScalingConfig,
        run: RunConfigCfg, metrics_path: str, column: str | None = "input_ids", callbacks: list | None = None,
        sweep_trial: bool = False):
    """Build and run the TorchTrainer; rerunning with the same name and storage path resumes."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    resume = latest_checkpoint(Path(storage_path) / name)
    if resume is not None:
        logger.info("resuming from %s", resume)
    loop_config = dict(config, setup=setup, datasets=sorted(datasets), metrics_path=metrics_path, column=column,
                       checkpoint_root=str(Path(storage_path) / name))
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    from pipeline.ray_utils import check_resources

    needed = {k: v * scaling.num_workers for k, v in resources.items()}
    needed["CPU"] += 1  # Ray Data's read tasks take one whole CPU beside the workers
    # a sweep's trials share the cluster by design (the sweep sized their concurrency): a sibling
    # trial holding CPUs is no news there
    check_resources(needed, f"training ({scaling.num_workers} workers x {resources}, plus one CPU for Ray Data's reads)",
                    warn_held=not sweep_trial)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        datasets=datasets,
        dataset_config=ordered_data_config(),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.num_to_keep,
                checkpoint_score_attribute=(run.checkpoint_metric or "val_loss")
                if "val" in datasets and run.checkpoint_metric != "last" else None,  # None: keep the latest
                checkpoint_score_order="max" if run.checkpoint_metric == "val_accuracy" else "min"),
            failure_config=FailureConfig(max_failures=run.max_failures),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()
