"""int8 quantization for CPU serving, and the one loader every serving path uses.

Choice: ``torch.ao``'s fbgemm/x86 int8 GEMMs with per-channel int8 weights, in eager mode on the
pinned torch (measured 3x faster than fp32 on a 768x3072 projection at batch 1 on this CPU, 3.7x
on the demo model's LM head). ``torch.ao`` is deprecated in favour of ``torchao``, whose CPU int8
path is built around ``torch.compile`` and targets GPUs first; the choice is isolated in this
module so moving to ``torchao`` later touches nothing else. It covers ``nn.Linear`` only: GPT-2's
``Conv1D`` layers (weight stored transposed) are first converted to equivalent ``nn.Linear``.

Activations: with calibration data (what the compress job passes), each layer's input is
quantized with a fixed per-tensor scale, the largest absolute input the layer saw on the
calibration rows (``Int8Linear``). Without, ``quantize_dynamic``'s per-call scale is used: it is
computed over the whole input tensor, so a row's result depends on the other rows of its batch
and on the other positions of its prompt; a served int8 model would then answer a seeded request
differently alone and in a batch, and with and without KV cache. The calibrated scale makes every
row and position independent, and costs no time per call (no min/max pass). Inputs beyond the
calibrated range saturate.

Format: ``model-int8.safetensors`` holds, per quantized layer, the int8 weight, the per-channel
scales and zero points, the fp32 bias and (calibrated) the input scale. The token embedding is
int8 too (per-row scales; dequantized to fp32 at load for the lookup): tied to the LM head, it is
the head's int8 rows and is not stored again. Every other tensor stays fp32.
``quantization.json`` marks the directory. ``load_model`` rebuilds the architecture from
``config.json`` (no remote code), quantizes it the same way and loads the stored int8 values; a
plain directory goes through ``from_pretrained``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

MARKER = "quantization.json"
WEIGHTS = "model-int8.safetensors"


def conv1d_to_linear(model) -> int:
    """Replace GPT-2 ``Conv1D`` (y = x W + b, W: in x out) with ``nn.Linear`` (W transposed)."""
    from transformers.pytorch_utils import Conv1D

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data.copy_(child.weight.data.t())
                lin.bias.data.copy_(child.bias.data)
                setattr(parent, name, lin)
                count += 1
    return count


class Int8Linear(nn.Module):
    """A dynamically quantized ``Linear``'s int8 weights, with the input quantized at a fixed,
    calibrated scale (zero point 128, symmetric) instead of a per-call one; fp32 out."""

    def __init__(self, qlinear, input_scale: float) -> None:
        super().__init__()
        self.inner = qlinear
        self.input_scale = float(input_scale)  # a float, not a buffer: save_int8 stores it itself
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            flat if flat.dtype == torch.float32 else flat.float(), self.input_scale, 128,
            self.inner._packed_params._packed_params)
        y = y.view(*shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def kernel_2d(self):
        """``forward`` for a 2-D float32 input, as the bare kernel call (the serving engine's lean
        decoder calls it on every token)."""
        op, scale, packed = (torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32, self.input_scale,
                             self.inner._packed_params._packed_params)
        return lambda x: op(x, scale, 128, packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale={self.input_scale:.3g}"


def calibrate(model, batches) -> dict[str, float]:
    """The largest absolute input of every ``nn.Linear`` over ``batches`` (model keyword
    arguments, e.g. ``{"input_ids": ...}``), by name."""
    amax: dict[str, float] = {}

    def hook(name):
        def record(module, inputs, output):
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_int8(model, calibration=None):
    """In place: Conv1D -> Linear, then every Linear to int8. ``calibration``: model inputs (an
    iterable of keyword-argument dicts) that fix each layer's activation scale; None: dynamic
    per-call scales (batch-dependent, see the module docstring)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    conv1d_to_linear(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb is not None and head is not None and head.weight is emb.weight
    amax = calibrate(model.eval(), calibration) if calibration is not None else None
    if amax is not None and not amax:
        raise ValueError("int8 calibration: no data reached the model's Linear layers")
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, see the module docstring
        model = quantize_dynamic(model.eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                 inplace=True)
    if amax is not None:
        _wrap(model, {name: (amax.get(name) or 1.0) / 127.0 for name in _quantized_layers(model)})
    if isinstance(emb, nn.Embedding):
        _int8_embedding(model, emb, tied)
    return model


def _int8_embedding(model, emb: nn.Embedding, tied: bool) -> None:
    """The token embedding becomes int8 values too (per row, symmetric), kept dequantized in fp32
    for the lookup: tied to the LM head, it takes the head's int8 rows (stored once, as the
    head's); else it is quantized on its own and stored as int8. ``model.int8_embedding`` says which."""
    with torch.no_grad():
        if tied:
            emb.weight = nn.Parameter(_head_weight(model).dequantize(), requires_grad=False)
            model.int8_embedding = "head"
        else:
            q, scales = _rows_int8(emb.weight.detach())
            emb.weight.copy_(q.float() * scales[:, None])
            model.int8_embedding = "own"


def _head_weight(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    inner = head.inner if isinstance(head, Int8Linear) else head
    return inner.weight()


def _rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 values and fp32 scales (a zero row gets scale 1)."""
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales.float()


def _embedding_name(model) -> str | None:
    emb = model.get_input_embeddings()
    return next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)


def _wrap(model, scales: dict[str, float]) -> None:
    """Replace the dynamic layers named in ``scales`` with ``Int8Linear`` at that input scale."""
    for name, scale in scales.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child), scale))


def _quantized_layers(model) -> dict[str, nn.Module]:
    """The dynamic int8 layers by name; inside an ``Int8Linear``, the wrapper's name."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QLinear):
            out[n[: -len(".inner")] if n.endswith(".inner") else n] = m
    return out


def save_int8(model, tokenizer, out_dir: str | Path, source: str) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = _quantized_layers(model)
    scales = {n: m.input_scale for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        if name in scales:
            tensors[f"{name}.input_scale"] = torch.tensor([scales[name]], dtype=torch.float64)
        w, b = m._packed_params._weight_bias()
        tensors[f"{name}.qweight"] = w.int_repr().contiguous()
        tensors[f"{name}.scales"] = w.q_per_channel_scales().float().contiguous()
        tensors[f"{name}.zero_points"] = w.q_per_channel_zero_points().to(torch.int32).contiguous()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
    prefixes = tuple(f"{n}." for n in layers)
    embedding = getattr(model, "int8_embedding", None)
    emb_name = _embedding_name(model) if embedding else None
    if embedding == "own":
        q, row_scales = _rows_int8(model.get_input_embeddings().weight.detach())
        tensors[f"{emb_name}.qweight"], tensors[f"{emb_name}.scales"] = q.contiguous(), row_scales.contiguous()
    seen: set[int] = set()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefixes) and id(p) not in seen and name != emb_name:  # tied weights stored once
            seen.add(id(p))
            tensors[name] = p.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    activations = "static per-tensor, calibrated" if len(scales) == len(layers) else "dynamic per-tensor"
    (out / MARKER).write_text(json.dumps({"method": "int8", "weights": "per-channel symmetric int8",
                                          "activations": activations, "layers": len(layers),
                                          "embedding": {"head": "int8 rows of the tied LM head",
                                                        "own": "per-row symmetric int8"}.get(embedding, "fp32"),
                                          "source": source}, indent=2))
    return out


def is_int8(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MARKER).exists()


def load_model(model_dir: str | Path, kind: str = "causal"):
    """A causal LM (``kind="causal"``) or sequence classifier (``"classifier"``) from a directory:
    Hugging Face safetensors, or our int8 format. Never remote code, never pickles."""
    import transformers

    from pipeline.model.build import load_pretrained

    auto = {"causal": transformers.AutoModelForCausalLM,
            "classifier": transformers.AutoModelForSequenceClassification}[kind]
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if not is_int8(model_dir):
        return load_pretrained(auto, model_dir, use_safetensors=True, trust_remote_code=False).eval()
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    model = quantize_int8(auto.from_config(config, dtype=torch.float32))  # as saved, whatever config.dtype says
    tensors = load_file(str(model_dir / WEIGHTS))
    _wrap(model, {n: float(tensors.pop(f"{n}.input_scale")) for n in _quantized_layers(model)
                  if f"{n}.input_scale" in tensors})
    for name, m in _quantized_layers(model).items():
        if f"{name}.qweight" not in tensors:
            raise ValueError(f"{model_dir}: int8 weights do not match the config (no {name}.qweight)")
        w = torch._make_per_channel_quantized_tensor(
            tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales").double(),
            tensors.pop(f"{name}.zero_points").long(), 0)
        m.set_weight_bias(w, tensors.pop(f"{name}.bias", None))
    # the token embedding: stored as int8 rows, or the tied LM head's (formats before both: fp32)
    emb_name = _embedding_name(model)
    marker = json.loads((model_dir / MARKER).read_text())
    if f"{emb_name}.qweight" in tensors:
        q, row_scales = tensors.pop(f"{emb_name}.qweight"), tensors.pop(f"{emb_name}.scales")
        tensors[emb_name] = q.float() * row_scales[:, None]
        model.int8_embedding = "own"
    elif marker.get("embedding") == "int8 rows of the tied LM head":
        model.get_input_embeddings().weight = nn.Parameter(_head_weight(model).dequantize(), requires_grad=False)
        model.int8_embedding = "head"
    else:  # stored in fp32
        model.int8_embedding = None
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    if getattr(model, "int8_embedding", None) == "head":
        own.pop(emb_name)
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(k for k, p in own.items() if k not in tensors and not any(p is own[t] for t in tensors if t in own))
    if unexpected or missing:
        raise ValueError(f"{model_dir}: int8 weights do not match the config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if own[name].shape != t.shape:
                raise ValueError(f"{model_dir}: {name} has shape {tuple(t.shape)}, the config expects "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(t)
    return model.eval()


def file_size(model_dir: str | Path) -> int:
    """Bytes of weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
