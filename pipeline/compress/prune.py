"""Pruning, pure torch on Hugging Face models.

- ``magnitude_prune``: global unstructured magnitude pruning over every 2-D projection weight
  (``nn.Linear`` and GPT-2's ``Conv1D``; embeddings and the tied LM head stay dense). The masks
  are made permanent (``prune.remove``): the saved tensors hold real zeros, shapes unchanged.
- ``structured_prune``: MLP neurons (GPT-2, Llama, BERT-style encoders) and attention heads (Llama) are physically
  removed, and the config's sizes are updated, so ``from_pretrained`` builds the smaller model
  and loads it. Importance is weight magnitude: a neuron scores the product of the L2 norms of
  its input row and output column, a head the L2 norm of its output-projection columns. Every
  layer keeps the same count, since a Hugging Face config holds one size for all layers.

GPT-2's and BERT's attention derive their head size from the width and the head count, so these
models cannot lose heads and still load with the stock classes: asking for it is an error; use
Llama for head pruning."""

from __future__ import annotations

import torch
from torch import nn


def projection_modules(model) -> list[tuple[str, nn.Module]]:
    """Every Linear / Conv1D inside the transformer blocks (not embeddings or the LM head)."""
    from transformers.pytorch_utils import Conv1D

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not out and m is not emb and "score" not in n
            and "classifier" not in n]


def magnitude_prune(model, sparsity: float) -> dict:
    import torch.nn.utils.prune as prune

    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    params = [(m, "weight") for _, m in projection_modules(model)]
    if not params:
        raise ValueError("no Linear/Conv1D projection weights to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    for m, name in params:
        prune.remove(m, name)  # permanent: weight is a plain tensor again, with zeros
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return {"pruned_weights": total, "zero_weights": zeros, "sparsity": zeros / total}


def _keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep).indices.sort().values


@torch.no_grad()
def structured_prune(model, *, mlp_keep: float = 1.0, heads_keep: float = 1.0) -> dict:
    """Keep the top ``mlp_keep`` share of MLP neurons and ``heads_keep`` share of attention heads
    (key/value groups under grouped-query attention) in every layer."""
    layout = check_structured(model, mlp_keep=mlp_keep, heads_keep=heads_keep)
    if layout == "gpt2":
        return _prune_gpt2_mlp(model, mlp_keep)
    if layout == "bert":
        return _prune_bert_mlp(model, mlp_keep)
    info = _prune_llama_mlp(model, mlp_keep)
    info.update(_prune_llama_heads(model, heads_keep))
    return info


def check_structured(model, *, mlp_keep: float = 1.0, heads_keep: float = 1.0) -> str:
    """The layout ``structured_prune`` would prune (``"gpt2"`` or ``"llama"``), or a ValueError saying
    why it cannot. Works on a model built on the meta device (no weights needed)."""
    if not 0 < mlp_keep <= 1 or not 0 < heads_keep <= 1:
        raise ValueError(f"mlp_keep and heads_keep must be in (0, 1], got {mlp_keep}, {heads_keep}")
    kind = model.config.model_type
    if kind == "gpt2":
        if heads_keep < 1:
            raise ValueError("gpt2 derives its head size from n_embd / n_head, so heads cannot be removed and the "
                             "model still load with GPT2 classes; prune MLP neurons only (heads_keep: 1.0) or use "
                             "a llama model")
        return "gpt2"
    if _llama_layout(model):  # Llama, Mistral, Qwen2/3, Gemma: the same module names and config keys
        return "llama"
    if _bert_layout(model):  # BERT, RoBERTa, ELECTRA: masked LMs and the classifiers made from them
        if heads_keep < 1:
            raise ValueError(f"{kind} derives its head size from hidden_size / num_attention_heads, so heads cannot "
                             f"be removed and the model still load with its Hugging Face classes; prune MLP neurons "
                             f"only (heads_keep: 1.0)")
        return "bert"
    raise ValueError(f"structured pruning supports GPT-2, BERT-style encoders (intermediate/output MLPs) and models "
                     f"with Llama's layout (Llama, Mistral, Qwen2, Gemma: q/k/v/o and gate/up/down projections), not "
                     f"{kind!r}; use method: magnitude or int8")


def _llama_layout(model) -> bool:
    layers = getattr(getattr(model, "model", None), "layers", None)
    c = model.config
    if not layers or not all(isinstance(getattr(c, k, None), int) for k in
                             ("intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size")):
        return False
    names = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
    return all(isinstance(getattr(getattr(layer, part, None), name, None), nn.Linear)
               for layer in layers for part, projs in names.items() for name in projs)


def _bert_layers(model):
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    return getattr(encoder, "layer", None)


def _bert_layout(model) -> bool:
    layers = _bert_layers(model)
    if not layers or not isinstance(getattr(model.config, "intermediate_size", None), int):
        return False
    return all(isinstance(getattr(getattr(layer, part, None), "dense", None), nn.Linear)
               for layer in layers for part in ("intermediate", "output"))


def _prune_bert_mlp(model, keep_share: float) -> dict:
    inner = model.config.intermediate_size
    keep = max(1, round(inner * keep_share))
    if keep == inner:
        return {}
    for layer in _bert_layers(model):
        up, down = layer.intermediate.dense, layer.output.dense  # up: (inner, d) rows; down: (d, inner) columns
        idx = _keep(up.weight.norm(dim=1) * down.weight.norm(dim=0), keep)
        layer.intermediate.dense, layer.output.dense = _linear_rows(up, idx), _linear_cols(down, idx)
    model.config.intermediate_size = keep
    return {"mlp_neurons": f"{inner} -> {keep}"}


def _prune_gpt2_mlp(model, keep_share: float) -> dict:
    from transformers.pytorch_utils import Conv1D

    blocks = model.transformer.h
    inner = blocks[0].mlp.c_fc.weight.shape[1]
    keep = max(1, round(inner * keep_share))
    for block in blocks:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: weight is (in, out)
        score = fc.weight.norm(dim=0) * proj.weight.norm(dim=1)
        idx = _keep(score, keep)
        new_fc = Conv1D(keep, fc.weight.shape[0])
        new_fc.weight.copy_(fc.weight[:, idx])
        new_fc.bias.copy_(fc.bias[idx])
        new_proj = Conv1D(proj.weight.shape[1], keep)
        new_proj.weight.copy_(proj.weight[idx, :])
        new_proj.bias.copy_(proj.bias)
        block.mlp.c_fc, block.mlp.c_proj = new_fc, new_proj
    model.config.n_inner = keep
    return {"mlp_neurons": f"{inner} -> {keep}"}


def _prune_llama_mlp(model, keep_share: float) -> dict:
    layers = model.model.layers
    inner = model.config.intermediate_size
    keep = max(1, round(inner * keep_share))
    if keep == inner:
        return {}
    for layer in layers:
        mlp = layer.mlp  # gate/up: (inner, d) rows; down: (d, inner) columns
        score = (mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1)) * mlp.down_proj.weight.norm(dim=0)
        idx = _keep(score, keep)
        mlp.gate_proj = _linear_rows(mlp.gate_proj, idx)
        mlp.up_proj = _linear_rows(mlp.up_proj, idx)
        mlp.down_proj = _linear_cols(mlp.down_proj, idx)
    model.config.intermediate_size = keep
    return {"mlp_neurons": f"{inner} -> {keep}"}


def _prune_llama_heads(model, keep_share: float) -> dict:
    c = model.config
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    group = n_heads // n_kv
    keep_kv = max(1, round(n_kv * keep_share))
    if keep_kv == n_kv:
        return {}
    for layer in model.model.layers:
        attn = layer.self_attn
        o = attn.o_proj.weight.view(c.hidden_size, n_kv, group, head_dim)  # columns grouped by kv group
        kv_idx = _keep(o.pow(2).sum(dim=(0, 2, 3)).sqrt(), keep_kv)
        q_heads = (kv_idx[:, None] * group + torch.arange(group)).flatten()
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        kv_rows = (kv_idx[:, None] * head_dim + torch.arange(head_dim)).flatten()
        attn.q_proj = _linear_rows(attn.q_proj, q_rows)
        attn.k_proj = _linear_rows(attn.k_proj, kv_rows)
        attn.v_proj = _linear_rows(attn.v_proj, kv_rows)
        attn.o_proj = _linear_cols(attn.o_proj, q_rows)
        for name in ("num_heads", "num_key_value_heads"):
            if hasattr(attn, name):
                setattr(attn, name, keep_kv * group if name == "num_heads" else keep_kv)
    c.head_dim = head_dim
    c.num_attention_heads, c.num_key_value_heads = keep_kv * group, keep_kv
    return {"attention_heads": f"{n_heads} -> {keep_kv * group}"}


def _linear_rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None)
    new.weight.data.copy_(lin.weight[idx])
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias[idx])
    return new


def _linear_cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None)
    new.weight.data.copy_(lin.weight[:, idx])
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias)
    return new
