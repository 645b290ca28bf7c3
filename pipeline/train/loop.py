"""The training loop, in plain torch: gradient accumulation and clipping, cosine LR with warmup,
autocast (bf16 on GPU, fp32 on CPU), periodic evaluation, early stopping and checkpoint hooks.

One loop serves pretraining (causal or masked), SFT and classification: each batch is a dict of
tensors that the model consumes as ``model(**batch).loss``. Distribution is injected: ``reduce``
averages a metric across workers (identity on one process), and the Ray Train wrapper passes
callbacks that report and checkpoint. Runs without Ray (``benchmarks/``, GPU scripts, tests).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal

import torch

from pipeline.config import check, check_seed
from pipeline.train.optim import make_optimizer
from pipeline.train.schedule import get_lr

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per worker per micro-batch
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 20  # per worker; 0 = the whole validation split (a checkpoint follows each evaluation)
    # rows shuffled within a buffer of this size (seeded by seed + epoch); corpora arrive sorted by
    # source and labeled files by id, and label- or source-homogeneous batches make training swing
    shuffle_buffer: int = 1024
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    log_every: int = 10
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16-native: bf16 autocast where the device
    # multiplies bf16 in hardware (CUDA; a CPU with AMX or AVX512-BF16: 1.55x and 2.08x per demo
    # step on this project's two CPU machine kinds), else fp32
    precision: Literal["auto", "fp32", "bf16", "bf16-native"] = "auto"
    compile: bool = False
    # the attention kernel while training: auto (the model's own: SDPA, torch's
    # scaled_dot_product_attention, for every architecture that has it, ours included; eager for
    # the rest), sdpa, or eager (transformers' matmul, softmax, matmul). All compute the same
    # function; on CPU threads in bf16, eager fine-tunes the demo classifier's 128-token windows
    # 1.36-1.41x faster than SDPA (the whole job), and pretraining's 256-token rows at about the
    # same speed (BENCHMARKS.md). Exported models load with their default, whatever trained them
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    seed: int = 0
    # stochastic weight averaging over the schedule's tail: the run ends on the mean of the weights
    # after each of its last ``average_last`` share of steps (``TailAverage``), not on the last
    # step's. 0: off. Evaluations before the end score the training weights, the last one the mean
    average_last: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every"):
            check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        check(self.eval_batches >= 0, f"train.eval_batches must be >= 0, got {self.eval_batches}")
        check(self.shuffle_buffer >= 0, f"train.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
              f"train.early_stopping_patience must be >= 1 or null, got {self.early_stopping_patience}")
        check_seed(self.seed, "train.seed")
        check(0 <= self.average_last <= 1, f"train.average_last must be in [0, 1], got {self.average_last}")
        check(not (self.average_last and self.early_stopping_patience is not None),
              "train.average_last averages the weights of the schedule's last steps, which a run stopped early "
              "never reaches: set train.early_stopping_patience null or train.average_last 0")

    @property
    def averaged_steps(self) -> int:
        """The number of final steps whose weights ``average_last`` averages."""
        return math.ceil(self.average_last * self.max_steps)


# keys added to LoopConfig after runs were made: at these defaults they stay out of the run
# directories' hashes (pipeline.config.without_defaults)
LATER_LOOP_KEYS = {"average_last": 0.0, "attention": "auto"}


@dataclass
class TrainState:
    """Everything besides weights and optimizer needed to continue a run exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch (data position)
    tokens: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def unwrap(model):
    """The bare model behind DDP / FSDP / torch.compile wrappers (and ``module``-holding ones such
    as ``pipeline.finetune.article.ArticleClassifier``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def set_attention(model, implementation: str) -> None:
    """Has the (possibly wrapped) Hugging Face model compute attention with ``implementation``
    (``train.attention``; ``auto`` keeps the model's own), a run-time setting that
    ``save_pretrained`` does not write. An architecture that cannot switch to it is an error."""
    if implementation == "auto":
        return
    bare = unwrap(model)
    current = getattr(bare.config, "_attn_implementation", None)
    if current != implementation:
        try:
            bare.set_attn_implementation(implementation)
        except (ValueError, ImportError) as e:
            raise ValueError(f"train.attention: {type(bare).__name__} cannot compute attention with "
                             f"{implementation!r} ({e}); set train.attention to auto") from e
        current = bare.config._attn_implementation
    if current != implementation:  # transformers only warns for architectures it cannot switch
        raise ValueError(f"train.attention: {type(bare).__name__} cannot compute attention with "
                         f"{implementation!r} (it uses {current!r}); set train.attention to auto")


class TailAverage:
    """The running mean, in fp32, of a model's parameters after each of a run's last steps
    (stochastic weight averaging over the end of the cosine schedule, ``train.average_last``):
    ``update`` after a step, ``apply`` writes the mean into the model. Weights late in a run
    jitter around a minimum along the directions of the last batches; their mean lies nearer its
    centre (BENCHMARKS.md: the demo classifier). A DDP run's ranks hold the same weights and so
    the same mean; under FSDP each rank averages its own shards and ``state_dict`` gathers them
    (a collective call: every rank makes it). Kept in the training state, so a resumed run
    continues the mean it had."""

    def __init__(self, model):
        self.model = model
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def _params(self):
        return unwrap(self.model).named_parameters()

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for name, p in self._params():
            if self.count == 1:
                self.mean[name] = p.detach().float().clone()
            else:
                self.mean[name].lerp_(p.detach().float(), 1.0 / self.count)

    @torch.no_grad()
    def apply(self) -> None:
        for name, p in self._params():
            p.copy_(self.mean[name].to(p.dtype))

    def state_dict(self) -> dict:
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # an FSDP shard: gathered
        return {"count": self.count, "mean": {k: full(v).cpu() for k, v in self.mean.items()}}

    def load_state_dict(self, saved: dict) -> None:
        self.count, self.mean = saved["count"], {}
        for name, p in self._params():
            t = saved["mean"][name].to(p.device)
            if hasattr(p, "device_mesh"):  # sharded: this rank keeps its own shard of the mean
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t, p.device_mesh, p.placements)
            self.mean[name] = t.clone()


CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU from Ampere on, or a
    CPU with AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 dot products (Intel Cooper
    Lake, AMD Zen 4 and later), which oneDNN's bf16 matmuls use. Elsewhere bf16 is emulated and
    slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # a torch without a probe: assume that instruction set is missing
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in CPU_BF16_PROBES)
    return False


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda") or \
            (precision == "bf16-native" and native_bf16(device)):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def label_tokens(batch: dict, shifted: bool = False) -> int:
    """Tokens that carry loss: labels other than -100 (a filler row has none), one per sequence
    for classification. ``shifted``: a causal LM predicts position i + 1 from position i, so the
    first label of a row is never a target."""
    labels = batch.get("labels")
    if labels is None:
        return int(batch["input_ids"].shape[0])
    if shifted and labels.dim() == 2:
        labels = labels[:, 1:]
    return int((labels != -100).sum())


def shifts_labels(model) -> bool:
    """Whether ``model``'s loss is next-token prediction (its labels shifted by one), seen through
    DDP and ``torch.compile`` wrappers."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return getattr(inner, "loss_type", None) == "ForCausalLM"


@torch.no_grad()
def estimate_loss(model, batches: Iterator[dict], device: torch.device, precision: str = "auto",
                  max_batches: int = 0, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Token-weighted mean loss over the batches (summed across workers with ``reduce``)."""
    was_training = model.training
    model.eval()
    # loss * n, n, and for sequence classification (one label per row): rows right, rows
    total = torch.zeros(4, dtype=torch.float64, device=device)
    shifted = shifts_labels(model)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = to_device(batch, device)
        with autocast_context(device, precision):
            out = model(**batch)
        n = label_tokens(batch, shifted)
        if not n:  # filler rows only: their mean loss is NaN, their weight 0
            continue
        labels = batch.get("labels")
        right, rows = 0, 0
        if labels is not None and labels.dim() == 1 and out.logits.dim() == 2:
            real = labels != -100
            right, rows = int(((out.logits.argmax(-1) == labels) & real).sum()), int(real.sum())
        total += torch.tensor([float(out.loss) * n, n, right, rows], dtype=torch.float64, device=device)
    if reduce is not None:
        total = reduce(total)
    model.train(was_training)
    loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    metrics = {"val_loss": loss, "val_tokens": int(total[1])}
    if total[3] > 0:  # one label per row: a class's cross-entropy, whose exponential is no perplexity
        metrics["val_accuracy"] = float(total[2] / total[3])
    else:
        metrics["val_ppl"] = math.exp(min(loss, 50.0))
    return metrics


class Trainer:
    """Runs optimizer steps over an endless stream of micro-batches."""

    def __init__(self, model, optim: OptimConfig, loop: LoopConfig, device: torch.device,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0):
        self.model = model
        self.optim_cfg = optim
        self.cfg = loop
        self.device = device
        self.optimizer = make_optimizer(model, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2),
                                        fused=device.type == "cuda")
        self.flops_per_token = flops_per_token
        self.shifted = shifts_labels(model)  # next-token labels: a row's first label is never a target
        self.last_loss_tokens = 0  # this worker's loss-carrying tokens in the last step
        self.peak_flops = peak_flops
        self.average = TailAverage(model) if loop.average_last else None
        set_attention(model, loop.attention)

    def lr_at(self, step: int) -> float:
        o = self.optim_cfg
        return get_lr(step, lr=o.lr, warmup_steps=o.warmup_steps, max_steps=self.cfg.max_steps,
                      min_lr=o.lr * o.min_lr_ratio)

    def train_step(self, micro_batches: list[dict], step: int,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1
                   ) -> tuple[float, int]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns this worker's
        loss (the mean over its loss-carrying tokens) and its tokens.

        The gradient is that of the mean loss over every loss-carrying token of the step (labels
        other than -100; one per row for classification), on every worker together: each
        micro-batch's mean loss is weighted by its share of those tokens, their count summed
        across workers with ``reduce`` (DDP and FSDP then average the workers' gradients, hence
        the ``world_size`` factor). Averaging micro-batch means instead would give a token of a
        micro-batch, or a worker, with few such tokens (an SFT batch of short answers) more weight
        than one with many, so that accumulation and more workers would not train as one large
        batch does. With equal counts (packed pretraining rows) the weights are exactly 1."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counts = [label_tokens(b, self.shifted) for b in micro_batches]
        local = sum(counts)
        total = float(reduce(torch.tensor([float(local)], dtype=torch.float64, device=self.device))) \
            if reduce is not None and world_size > 1 else float(local)
        self.last_loss_tokens = local
        total_loss, tokens = 0.0, 0
        for i, (batch, n) in enumerate(zip(micro_batches, counts)):
            batch = to_device(batch, self.device)
            last = i == len(micro_batches) - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter on the last only
                self.model.set_requires_gradient_sync(last)
                ctx = nullcontext()
            else:  # DDP: all-reduce on the last micro-batch only
                sync = getattr(self.model, "no_sync", None)
                ctx = sync() if sync is not None and not last else nullcontext()
            with ctx, autocast_context(self.device, self.cfg.precision):
                out = self.model(**batch)
            if n:
                (out.loss * (n * world_size / total)).backward()  # exactly 1 for equal counts
                total_loss += float(out.loss.detach()) * n / local
            else:  # nothing to learn here (its mean loss is NaN): zero gradients, but DDP still syncs
                (out.logits.float().sum() * 0.0).backward()
            tokens += count_tokens(batch)
        if self.optim_cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def fit(
        self,
        state: TrainState,
        train_batches: Callable[[int], Iterator[dict]],
        val_batches: Callable[[], Iterator[dict]] | None = None,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_log: Callable[[dict], None] | None = None,
        on_eval: Callable[[dict, TrainState, bool], None] | None = None,
        world_size: int = 1,
    ) -> TrainState:
        """Train until ``max_steps`` or early stopping. ``train_batches(epoch)`` yields the
        micro-batches of one epoch; on resume the first ``state.batches_in_epoch`` are skipped.
        ``on_eval(metrics, state, is_last)`` is called after each evaluation, at the same steps
        on every worker (so a Ray Train wrapper can report and checkpoint from it)."""
        cfg = self.cfg
        self.model.train()
        if state.step >= cfg.max_steps:
            # resumed from the final checkpoint (a rerun of a finished run, e.g. a sweep trial run
            # again): evaluate once more so the run still reports its final metrics
            last = state.history[-1]["loss"] if state.history else float("nan")
            self._evaluate(state, last, val_batches, reduce, on_eval, force_last=True)
            return state
        it = self._epoch_iter(train_batches, state)
        t_last, tokens_last, wait = time.perf_counter(), 0, 0.0
        while state.step < cfg.max_steps:
            micro = []
            t_wait = time.perf_counter()
            while len(micro) < cfg.grad_accum:
                batch = next(it, None)
                if batch is None:  # epoch finished
                    state.epoch += 1
                    state.batches_in_epoch = 0
                    it = self._epoch_iter(train_batches, state)
                    batch = next(it, None)
                    if batch is None:
                        raise ValueError("the training split yields no batch: too little data for train.batch_size")
                micro.append(batch)
                state.batches_in_epoch += 1
            wait += time.perf_counter() - t_wait
            loss, tokens = self.train_step(micro, state.step, reduce, world_size)
            state.step += 1
            if self.average is not None and state.step > cfg.max_steps - cfg.averaged_steps:
                self.average.update()
                if state.step == cfg.max_steps:  # the run ends on the mean: evaluated, checkpointed, exported
                    self.average.apply()
                    logger.info("the final weights are the mean of the last %d steps' (train.average_last %g)",
                                self.average.count, cfg.average_last)
            log_now = state.step % cfg.log_every == 0 or state.step == cfg.max_steps
            eval_now = state.step % cfg.eval_every == 0 or state.step == cfg.max_steps
            if reduce is not None and world_size > 1 and (log_now or eval_now):
                # logged and reported: the step's loss over every worker's tokens, not rank 0's alone
                # (same steps on every rank)
                t = reduce(torch.tensor([loss * self.last_loss_tokens, self.last_loss_tokens], dtype=torch.float64,
                                        device=self.device))
                loss = float(t[0] / t[1]) if t[1] > 0 else float("nan")
            state.tokens += tokens * world_size
            tokens_last += tokens * world_size
            if log_now:
                dt = time.perf_counter() - t_last
                tps = tokens_last / dt if dt > 0 else 0.0
                record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": self.lr_at(state.step - 1),
                          "tokens": state.tokens, "tokens_per_s": tps,
                          "data_wait_frac": wait / dt if dt > 0 else 0.0}  # time spent waiting for input
                if self.peak_flops and self.flops_per_token:
                    record["mfu"] = tps * self.flops_per_token / (self.peak_flops * world_size)
                state.history.append(record)
                if on_log:
                    on_log(record)
                t_last, tokens_last, wait = time.perf_counter(), 0, 0.0
            if eval_now:
                if self._evaluate(state, loss, val_batches, reduce, on_eval):
                    break
        return state

    def _evaluate(self, state: TrainState, train_loss: float, val_batches, reduce, on_eval,
                  force_last: bool = False) -> bool:
        """Validation, early-stopping bookkeeping and the ``on_eval`` hook; True when training ends."""
        cfg = self.cfg
        is_last = force_last or state.step >= cfg.max_steps
        metrics = {"step": state.step, "epoch": state.epoch, "tokens": state.tokens, "train_loss": train_loss}
        if self.average is not None and self.average.count:
            # steps in the tail's mean so far; the last evaluation scores that mean
            metrics["tail_average_steps"] = self.average.count
        if val_batches is not None:
            metrics.update(estimate_loss(self.model, val_batches(), self.device, cfg.precision, cfg.eval_batches, reduce))
            if metrics["val_loss"] < state.best_val_loss:
                state.best_val_loss = metrics["val_loss"]
                state.evals_without_improvement = 0
            elif not force_last:
                state.evals_without_improvement += 1
            patience = cfg.early_stopping_patience
            if patience is not None and state.evals_without_improvement >= patience:
                logger.info("early stopping at step %d: no val improvement in %d evaluations", state.step, patience)
                is_last = True
        if on_eval:
            on_eval(metrics, state, is_last)
        return is_last

    @staticmethod
    def _epoch_iter(train_batches, state: TrainState) -> Iterator[dict]:
        it = iter(train_batches(state.epoch))
        for _ in range(state.batches_in_epoch):  # resume mid-epoch at the recorded data position
            if next(it, None) is None:
                break
        return it
