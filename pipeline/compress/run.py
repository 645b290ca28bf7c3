"""The compress job: every variant (pruned, quantized) of every model, saved as a servable
directory, and one table against the base: parameters, weight-file size, decode tokens/s
(greedy, batch 1, KV cache, one thread, median of ``repeats``), validation perplexity for
causal LMs, macro-F1 on the labeled test split for classifiers.

    python -m jobs.compress --config jobs/configs/compress_demo.yaml

Output: ``<output_dir>/<name>-<config hash>/{<model>-<variant>/, results.json, results.md}``;
a rerun with the same config returns the stored results."""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config import check, check_local, check_name, check_seed, config_hash, to_dict
from pipeline.stamps import FINISHED, check_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    path: str  # a model directory, or the pretrain / finetune config YAML whose exported model to use
    kind: Literal["causal", "classifier"] = "causal"

    def __post_init__(self) -> None:
        check_name(self.name, "models[].name")
        check_local(self.path, f"models[{self.name}].path")


@dataclass(frozen=True, kw_only=True)
class VariantSpec:
    name: str
    method: Literal["magnitude", "structured", "int8"]
    sparsity: float = 0.5  # magnitude
    mlp_keep: float = 0.5  # structured
    heads_keep: float = 1.0  # structured (llama only)
    # int8: training rows that fix each layer's activation scale (batch-invariant, see
    # pipeline/compress/quantize.py); 0 = dynamic per-call scales, which depend on the batch
    calibration_rows: int = 64

    def __post_init__(self) -> None:
        check_name(self.name, "variants[].name")
        # checked whatever the method, so a value meant for another method is still a valid one
        check(0 < self.sparsity < 1, f"variants[{self.name}].sparsity must be in (0, 1), got {self.sparsity}")
        check(self.calibration_rows >= 0, f"variants[{self.name}].calibration_rows must be >= 0, got {self.calibration_rows}")
        check(0 < self.mlp_keep <= 1, f"variants[{self.name}].mlp_keep must be in (0, 1], got {self.mlp_keep}")
        check(0 < self.heads_keep <= 1, f"variants[{self.name}].heads_keep must be in (0, 1], got {self.heads_keep}")


@dataclass(frozen=True, kw_only=True)
class CompressEvalConfig:
    lm_data: str | None = None  # prepare config or output dir: its val shards score perplexity
    lm_rows: int = 64  # packed val rows scored (a seeded random sample of the split; 0 = all)
    classify_data: str | None = None  # prepare config / output dir with labeled/, or a labeled file
    classify_split: str = "test"
    classify_rows: int = 300  # texts scored (a seeded random sample of the split; 0 = all)
    classify_train_data: str | None = None  # labeled file to calibrate int8 on (default: classify_data's train split)
    text_field: str = "text"  # classify_data's (and classify_train_data's) columns
    label_field: str = "label"
    seed: int = 0  # which rows are sampled, for scoring and for int8 calibration
    max_len: int = 256  # LM rows: tokens scored per row
    classify_max_len: int | None = None  # null: the reading saved with the classifier (see evaluate)
    decode_tokens: int = 64
    decode_prompt: str = "The government said on Monday that"
    repeats: int = 3
    threads: int = 1

    def __post_init__(self) -> None:
        check(self.repeats >= 1 and self.decode_tokens >= 1, "eval.repeats and eval.decode_tokens must be >= 1")
        check(self.lm_rows >= 0 and self.classify_rows >= 0, "eval.lm_rows and eval.classify_rows must be >= 0 (0: all)")
        check(self.threads >= 1, f"eval.threads must be >= 1, got {self.threads}")
        check_seed(self.seed, "eval.seed")
        check(bool(self.decode_prompt.strip()), "eval.decode_prompt must be a non-empty text (the decode speed's prompt)")
        check(self.max_len >= 2, f"eval.max_len must be >= 2 (tokens per LM row), got {self.max_len}")
        check(self.classify_max_len is None or self.classify_max_len >= 8,
              f"eval.classify_max_len must be >= 8 or null, got {self.classify_max_len}")


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    name: str = "compress"
    output_dir: str = "outputs/compress"
    models: list[ModelSpec] = field(default_factory=list)
    variants: list[VariantSpec] = field(default_factory=list)
    eval: CompressEvalConfig = field(default_factory=CompressEvalConfig)

    def __post_init__(self) -> None:
        check(bool(self.models), "models: name at least one model to compress")
        check_name(self.name)
        check_local(self.output_dir, "output_dir")
        check_local(self.eval.lm_data, "eval.lm_data")
        check(bool(self.variants), "variants: name at least one variant")
        for what, items in (("models", self.models), ("variants", self.variants)):
            names = [m.name for m in items]
            check(len(set(names)) == len(names), f"{what}: names must be unique, got {names}")


def resolve_model(spec: str) -> Path:
    """A model directory, or a pretrain / finetune YAML (a finetune config has a ``task`` key)."""
    from pipeline.config import load_yaml
    from pipeline.finetune.finetune import resolve_finetuned, resolve_model_dir

    if spec.endswith((".yaml", ".yml")):
        path = resolve_finetuned(spec) if "task" in load_yaml(spec) else resolve_model_dir(spec)
    else:
        path = Path(spec)
    check((path / "config.json").exists(), f"model {spec}: {path} is not a model directory (train it first)")
    return path


def make_variant(model_dir: Path, kind: str, v: VariantSpec, out: Path, e: CompressEvalConfig | None = None) -> dict:
    import transformers

    from pipeline.compress.prune import magnitude_prune, structured_prune
    from pipeline.compress.quantize import load_model, quantize_int8, save_int8

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = load_model(model_dir, kind)
    if v.method == "int8":
        calibration = _calibration(model, tok, kind, e or CompressEvalConfig(), v) if v.calibration_rows else None
        save_int8(quantize_int8(model, calibration), tok, out, source=str(model_dir))
        return {"method": "int8", "activations": "calibrated" if calibration else "dynamic",
                **({"calibration_rows": len(calibration)} if calibration else {})}
    info = magnitude_prune(model, v.sparsity) if v.method == "magnitude" else \
        structured_prune(model, mlp_keep=v.mlp_keep, heads_keep=v.heads_keep)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "compression.json").write_text(json.dumps({**to_dict(v), **info, "source": str(model_dir)}, indent=2))
    return info


def measure(model_dir: Path, kind: str, e: CompressEvalConfig, lm_rows: list | None, cls_rows: list | None) -> dict:
    import torch
    import transformers

    from pipeline.compress.quantize import file_size, load_model

    torch.set_num_threads(e.threads)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = load_model(model_dir, kind)
    params = sum(p.numel() for p in model.parameters())
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    params += sum(m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0)
                  for m in model.modules() if isinstance(m, QLinear))
    nonzero = sum(int((p != 0).sum()) for p in model.parameters()) + \
        sum(int((m.weight().int_repr() != 0).sum()) for m in model.modules() if isinstance(m, QLinear))
    if getattr(model, "int8_embedding", None) == "head":  # one tensor, tied: counted once, as the head
        emb = model.get_input_embeddings().weight
        params, nonzero = params - emb.numel(), nonzero - int((emb != 0).sum())
    row = {"parameters": params, "nonzero_parameters": nonzero, "file_bytes": file_size(model_dir)}
    if kind == "causal":
        from pipeline.serve.engine import Engine, SamplingParams

        from pipeline.model.build import context_length

        # an ALiBi model records no context length: the decode measurement needs only its own tokens
        engine = Engine(model, tok, max_batch_size=1, context_length=context_length(
            model.config, default=len(tok(e.decode_prompt)["input_ids"]) + e.decode_tokens))
        prompt = engine.encode(e.decode_prompt)
        n = min(e.decode_tokens, engine.context_length - len(prompt))
        engine.generate([(prompt, SamplingParams(max_tokens=4, temperature=0))])  # warm-up
        speeds = []
        for _ in range(e.repeats):
            t = time.perf_counter()
            g = engine.generate([(prompt, SamplingParams(max_tokens=n, temperature=0, stop=()))])[0]
            speeds.append(max(1, len(g.token_ids)) / (time.perf_counter() - t))
        row["decode_tokens_per_s"] = statistics.median(speeds)
        if lm_rows:
            from pipeline.evaluate.lm import lm_metrics_from_rows

            row.update({f"val_{k}": v for k, v in lm_metrics_from_rows(model, tok, lm_rows).items()
                        if k in ("loss", "perplexity")})
    elif cls_rows:
        from pipeline.evaluate.classify import classification_metrics, predict_labels

        from pipeline.finetune.classify_data import label_name

        labels = [label_name(model.config.id2label[i]) for i in range(len(model.config.id2label))]
        preds = [label_name(p) for p in predict_labels(model, tok, [r["text"] for r in cls_rows], e.classify_max_len)]
        m = classification_metrics([r["label"] for r in cls_rows], preds, labels)
        row.update({"f1_macro": m["f1_macro"], "accuracy": m["accuracy"]})
    return row


def _lm_rows(e: CompressEvalConfig, split: str = "val", n: int | None = None) -> list | None:
    if not e.lm_data:
        return None
    from pipeline.train.data import load_manifest, resolve_prepared, sample_shard_rows, shard_paths

    prepared = resolve_prepared(e.lm_data)
    files = shard_paths(prepared, load_manifest(prepared, "eval.lm_data"), split)
    check(bool(files), f"eval.lm_data {e.lm_data}: no {split} shards")
    rows = sample_shard_rows(files, e.lm_rows if n is None else n, e.seed)
    return [r[: e.max_len] for r in rows]


def _cls_rows(e: CompressEvalConfig, split: str | None = None, n: int | None = None) -> list | None:
    if not e.classify_data:
        return None
    from pipeline.train.data import sample_rows
    from pipeline.evaluate.run import _labeled_files, _read_split

    split = split or e.classify_split
    files = _labeled_files(e.classify_data)
    if split == "train" and e.classify_train_data:
        files = {"train": e.classify_train_data}
    check(split in files, f"eval.classify_data {e.classify_data}: no {split!r} split"
                          + (" (give eval.classify_train_data, a labeled file)" if split == "train" else ""))
    rows = _read_split(files[split], e.text_field, e.label_field, None, [])
    return sample_rows(rows, e.classify_rows if n is None else n, e.seed)


def _calibration(model, tok, kind: str, e: CompressEvalConfig, v: VariantSpec) -> list[dict]:
    """Model inputs for int8 calibration: ``v.calibration_rows`` rows of the *training* split
    (packed token rows for a causal LM, texts read as the classifier reads them), one per batch
    so that no padding enters the scales."""
    import torch

    where = "eval.lm_data" if kind == "causal" else "eval.classify_data"
    rows = _lm_rows(e, "train", v.calibration_rows) if kind == "causal" else _cls_rows(e, "train", v.calibration_rows)
    check(bool(rows), f"variants[{v.name}].calibration_rows: {where} must name data with a train split to "
                      f"calibrate int8 activations on (or set calibration_rows: 0 for dynamic scales)")
    if kind == "causal":
        return [{"input_ids": torch.tensor([r], dtype=torch.long)} for r in rows if r]
    from pipeline.evaluate.classify import reading

    max_len = reading(model, e.classify_max_len).max_len
    return [{"input_ids": torch.tensor([tok(r["text"], truncation=True, max_length=max_len)["input_ids"]])}
            for r in rows if r["text"]]


def compress_run_dir(cfg: CompressConfig) -> Path:
    models = [(m, resolve_model(m.path)) for m in cfg.models]
    key = {**to_dict(cfg), "output_dir": None, "models": [{**to_dict(m), "path": str(p.resolve())} for m, p in models]}
    return Path(cfg.output_dir).resolve() / f"{cfg.name}-{config_hash(key)}"


def resolve_variant(spec: str) -> Path:
    """``compress.yaml#<model>-<variant>``: that variant's directory in the compress job's output."""
    from pipeline.config import load_config

    path, _, name = spec.partition("#")
    return compress_run_dir(load_config(CompressConfig, path)) / name


def _check_variants(cfg: CompressConfig, models: dict) -> None:
    """No model is already int8, each is of its stated kind, and every structured variant applies
    to every model (checked on weightless meta models), before any work starts."""
    import torch
    import transformers

    from pipeline.compress.prune import check_structured
    from pipeline.compress.quantize import is_int8

    from pipeline.model.build import require_causal, require_classifier

    structured = [v for v in cfg.variants if v.method == "structured"]
    for spec, src in models.values():
        check(not is_int8(src), f"models[{spec.name}]: {src} is an int8 model; compress a floating-point one")
        if spec.kind == "causal":
            require_causal(src, f"models[{spec.name}]", "kind: causal (decode speed and perplexity)")
        else:
            require_classifier(src, f"models[{spec.name}]")
        if not structured:
            continue
        auto = transformers.AutoModelForCausalLM if spec.kind == "causal" else \
            transformers.AutoModelForSequenceClassification
        with torch.device("meta"):
            model = auto.from_config(transformers.AutoConfig.from_pretrained(str(src), local_files_only=True))
        for v in structured:
            try:
                check_structured(model, mlp_keep=v.mlp_keep, heads_keep=v.heads_keep)
            except ValueError as e:
                raise ValueError(f"variants[{v.name}] on models[{spec.name}]: {e}") from None


def check_compress(cfg: CompressConfig) -> dict:
    """The models by name, as (spec, directory), checked before any work (no cluster needed):
    each exists and is of its kind, shares the tokenizer of ``eval.lm_data`` when it is scored
    on it, and every variant applies to it."""
    models = {m.name: (m, resolve_model(m.path)) for m in cfg.models}
    if cfg.eval.lm_data:  # its token rows score (and calibrate) the causal models
        from pipeline.train.data import check_same_tokenizer, load_manifest, resolve_prepared

        prepared = resolve_prepared(cfg.eval.lm_data)
        load_manifest(prepared, "eval.lm_data")
        for spec, src in models.values():
            if spec.kind == "causal":
                check_same_tokenizer(prepared, src, f"eval.lm_data (model {spec.name})")
    from pipeline.data.sources import check_not_cache, check_one_split

    for key in ("classify_data", "classify_train_data"):  # labeled data: one split's files
        if getattr(cfg.eval, key):
            check_one_split(getattr(cfg.eval, key), f"eval.{key}")
            check_not_cache(getattr(cfg.eval, key), f"eval.{key}")
    _check_variants(cfg, models)
    if any(v.method == "int8" and v.calibration_rows for v in cfg.variants):  # calibration data exists
        _check_calibration_data(cfg, models)
    return models


def _check_calibration_data(cfg: CompressConfig, models: dict) -> None:
    from pipeline.evaluate.run import _labeled_files
    from pipeline.train.data import load_manifest, resolve_prepared, shard_paths

    e, kinds = cfg.eval, {spec.kind for spec, _ in models.values()}
    fix = "or set calibration_rows: 0 on the int8 variants for dynamic scales"
    if "causal" in kinds:
        check(bool(e.lm_data), f"int8 calibration of a causal LM reads train rows of eval.lm_data: set it, {fix}")
        prepared = resolve_prepared(e.lm_data)
        check(bool(shard_paths(prepared, load_manifest(prepared, "eval.lm_data"), "train")),
              f"eval.lm_data {e.lm_data}: no train shards to calibrate int8 on; {fix}")
    if "classifier" in kinds:
        if e.classify_train_data:
            from pipeline.data.sources import input_exists

            check(input_exists(e.classify_train_data),
                  f"eval.classify_train_data not found: {e.classify_train_data}")
        else:
            check(bool(e.classify_data) and "train" in _labeled_files(e.classify_data),
                  f"int8 calibration of a classifier reads texts of a train split: eval.classify_data "
                  f"{e.classify_data} has none; set eval.classify_train_data (a labeled file), {fix}")


def run_compress(cfg: CompressConfig) -> dict:
    out = compress_run_dir(cfg)
    # a model re-exported to a path this run compressed since: said, not reused in silence
    inputs = {f"models[{i}]": str(resolve_model(m.path)) for i, m in enumerate(cfg.models)}
    if (out / "results.json").exists():
        changed = check_inputs(out, inputs, "compress", FINISHED, exclude=Path(cfg.output_dir))
        logger.info("compress: %s is already complete (same config); not recomputing", out)
        return {**json.loads((out / "results.json").read_text()), **({"inputs_changed": changed} if changed else {})}
    models = check_compress(cfg)
    check_inputs(out, inputs, "compress", "it reuses the variants it finished" if any(out.glob("*/config.json")) else None,
                 exclude=Path(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    lm_rows, cls_rows = _lm_rows(cfg.eval), _cls_rows(cfg.eval)
    rows = []
    for spec, src in models.values():
        base = {"model": spec.name, "variant": "base", "kind": spec.kind, "path": str(src),
                **measure(src, spec.kind, cfg.eval, lm_rows, cls_rows)}
        rows.append(base)
        logger.info("compress: %s base %s", spec.name, base)
        for v in cfg.variants:
            vdir = out / f"{spec.name}-{v.name}"
            tmp = vdir.with_name(vdir.name + ".tmp")
            if not vdir.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
                info = make_variant(src, spec.kind, v, tmp, cfg.eval)
                tmp.rename(vdir)
            else:
                info = {}
            row = {"model": spec.name, "variant": v.name, "kind": spec.kind, "path": str(vdir), "method": v.method,
                   **{k: str(val) for k, val in info.items() if k != "method"},
                   **measure(vdir, spec.kind, cfg.eval, lm_rows, cls_rows)}
            _relative(row, base)
            rows.append(row)
            logger.info("compress: %s %s %s", spec.name, v.name, row)
    result = {"output_dir": str(out), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(render_table(rows))
    return result


def _relative(row: dict, base: dict) -> None:
    if base.get("decode_tokens_per_s") and row.get("decode_tokens_per_s"):
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    if base.get("val_perplexity") and row.get("val_perplexity"):
        row["perplexity_change"] = row["val_perplexity"] / base["val_perplexity"] - 1
    row["size_ratio"] = row["file_bytes"] / max(1, base["file_bytes"])


def render_table(rows: list[dict]) -> str:
    def f(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"

    lines = ["| model | variant | parameters | non-zero | file MB | size vs base | decode tok/s | speed-up | "
             "val ppl | ppl change | macro-F1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['parameters']:,} | {r['nonzero_parameters']:,} | "
                     f"{r['file_bytes'] / 1e6:.1f} | {f(r, 'size_ratio', '.2f')} | {f(r, 'decode_tokens_per_s', '.1f')} | "
                     f"{f(r, 'decode_speedup', '.2f')} | {f(r, 'val_perplexity', '.2f')} | "
                     f"{f(r, 'perplexity_change', '+.1%')} | {f(r, 'f1_macro', '.3f')} |")
    return "\n".join(lines) + "\n"
