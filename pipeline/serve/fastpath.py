"""A lean incremental forward pass for GPT-2 and Llama models, used by the serving engine.

``transformers``' generic forward costs more than the arithmetic for small models at small batch
sizes: cache objects, mask builders, attention dispatch and output dataclasses run for every
token, and its KV cache grows by ``torch.cat`` (copying the whole cache every step). Here the same
weights of the same model are used directly: each projection and norm is one kernel call on
2-D hidden states (``kernel_2d``, ``norm_fn``; GPT-2's ``Conv1D``, ``nn.Linear``, our int8
``Int8Linear``; other module types through their own ``forward``), one-query attention is
three batched kernels with the mask added inside the first (``decode_attention``), and the
keys and values are written into preallocated buffers that grow by doubling. It computes
the function the ``transformers`` model computes; the tests hold its logits equal to the
``transformers`` forward's and its greedy output equal token for token.

Only what serving needs: left-padded rows (``mask``), explicit positions, the last position's
logits. GPT-2 (``GPT2Decoder``) and Llama (``LlamaDecoder``), the two families the pipeline
builds; any other architecture goes through ``transformers`` unchanged (``decoder_for``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Per layer, keys and values ``[rows, heads, capacity, head_dim]``; the first ``length``
    columns are filled (the same columns in every row: rows are left-padded to one width)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        self.keys, self.values, self.length = keys, values, length

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``[rows, heads, t, head_dim]``) after the filled columns; returns the
        layer's filled keys and values including them. ``advance(t)`` once all layers wrote."""
        end = self.length + k.shape[2]
        if layer >= len(self.keys):  # first write (prefill)
            cap = max(end, 32)
            self.keys.append(k.new_zeros(*k.shape[:2], cap, k.shape[3]))
            self.values.append(v.new_zeros(*v.shape[:2], cap, v.shape[3]))
        elif end > self.keys[layer].shape[2]:
            self.keys[layer] = self._grown(self.keys[layer], end)
            self.values[layer] = self._grown(self.values[layer], end)
        self.keys[layer].narrow(2, self.length, k.shape[2]).copy_(k)
        self.values[layer].narrow(2, self.length, v.shape[2]).copy_(v)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def _grown(self, t: torch.Tensor, need: int) -> torch.Tensor:
        out = t.new_zeros(*t.shape[:2], max(need, 2 * t.shape[2]), t.shape[3])
        out[:, :, :self.length] = t[:, :, :self.length]
        return out

    def advance(self, t: int) -> None:
        self.length += t

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in that order)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def drop_leading(self, n: int) -> None:
        """Forget the first ``n`` columns (padding in every row)."""
        self.keys = [k[:, :, n:] for k in self.keys]
        self.values = [v[:, :, n:] for v in self.values]
        self.length -= n

    @staticmethod
    def merge(a: "KVCache", b: "KVCache", pad_a: int, pad_b: int) -> "KVCache":
        """The rows of ``a`` then ``b``, each left-padded (zeros, masked by the caller) to one width."""
        length = max(a.length + pad_a, b.length + pad_b)
        assert a.length + pad_a == b.length + pad_b == length, "merged rows must end in the same column"
        keys, values = [], []
        for ka, va, kb, vb in zip(a.keys, a.values, b.keys, b.values):
            rows = ka.shape[0] + kb.shape[0]
            cap = max(length + 16, ka.shape[2] + pad_a)
            k = ka.new_zeros(rows, ka.shape[1], cap, ka.shape[3])
            v = va.new_zeros(rows, va.shape[1], cap, va.shape[3])
            k[:ka.shape[0], :, pad_a:length] = ka[:, :, :a.length]
            v[:ka.shape[0], :, pad_a:length] = va[:, :, :a.length]
            k[ka.shape[0]:, :, pad_b:length] = kb[:, :, :b.length]
            v[ka.shape[0]:, :, pad_b:length] = vb[:, :, :b.length]
            keys.append(k)
            values.append(v)
        return KVCache(keys, values, length)


def decoder_for(model):
    """The lean decoder computing this model's function, or None (use the ``transformers`` forward)."""
    name = type(model).__name__
    if name == "GPT2LMHeadModel" and not getattr(model.config, "add_cross_attention", False):
        return GPT2Decoder(model)
    if name == "LlamaForCausalLM":
        return LlamaDecoder(model)
    return None


def attention_bias(mask: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias ``[rows, 1, t, columns]`` from the 0/1 padding mask ``[rows, columns]``: the
    last ``t`` columns are the queries, causal. A padded query still sees itself, so that no row
    of the softmax is empty (an all-masked row would give NaN, and 0 x NaN is NaN downstream)."""
    rows, cols = mask.shape
    keep = mask[:, None, None, :].bool()
    if t > 1:
        q = torch.arange(cols - t, cols, device=mask.device)[:, None]
        k = torch.arange(cols, device=mask.device)[None, :]
        keep = (keep & (k <= q)) | (k == q)
    bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~keep, float("-inf"))


def kernel_2d(module):
    """``module``'s function on a 2-D input ``[n, in_features]``, calling its kernel directly where
    the module is a known projection (GPT-2's ``Conv1D``, ``nn.Linear``, our calibrated int8
    ``Int8Linear``): one ATen call instead of reshapes around it and Python frames on every token.
    The weights are read here, once: a model whose parameters are replaced later needs a new
    decoder. Anything else keeps its own ``forward``."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is Conv1D:
        w, b = module.weight, module.bias
        return lambda x: torch.addmm(b, x, w)
    if type(module) is nn.Linear:
        w, b = module.weight, module.bias
        return lambda x: F.linear(x, w, b)
    direct = getattr(module, "kernel_2d", None)
    return direct() if direct is not None else module.forward


def norm_fn(module):
    """A LayerNorm / Llama RMSNorm as one ATen call (the same arithmetic); other norms as they are."""
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        shape, w, b, eps = tuple(module.normalized_shape), module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    # Llama's RMSNorm computes in float32 whatever the input's dtype: the fused call is the same
    # arithmetic only for float32 weights
    if type(module).__name__ == "LlamaRMSNorm" and hasattr(F, "rms_norm") and module.weight.dtype == torch.float32:
        w, eps = module.weight, module.variance_epsilon
        return lambda x: F.rms_norm(x, (w.shape[0],), w, eps)
    return module.forward


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one query per row (``t == 1``) in three batched kernels: ``q`` ``[b, g, dim]``
    (``g`` query heads sharing a key/value head), ``keys``/``values`` ``[b, L, dim]``, ``bias``
    ``[b, g, L]``; returns ``[b, g, dim]``. ``baddbmm`` adds the mask bias to the scaled scores
    in the same call."""
    return torch.bmm(torch.softmax(torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=scale), dim=-1), values)


def _bias_3d(bias: torch.Tensor, heads: int, group: int) -> torch.Tensor:
    """``[rows, 1, 1, L]`` -> ``[rows * heads, group, L]`` (built once per step, shared by the layers)."""
    rows, _, _, cols = bias.shape
    return bias.expand(rows, heads, group, cols).reshape(rows * heads, group, cols)


class GPT2Decoder:
    """``GPT2LMHeadModel``'s function for incremental decoding. Built once per model: the per-layer
    modules' ``forward`` methods, head sizes and attention scales are looked up here, not on every
    token (module ``__call__`` and ``transformers`` config lookups cost more than a small layer's
    arithmetic). The modules are used as they are, so a model changed in place (int8 layers,
    pruned MLPs) needs a new decoder."""

    def __init__(self, model) -> None:
        tr, cfg = model.transformer, model.config
        self.wte, self.wpe, self.ln_f, self.lm_head = tr.wte.forward, tr.wpe.forward, norm_fn(tr.ln_f), kernel_2d(model.lm_head)
        # GPT-2's tanh-approximated GELU: "gelu_new" spells it as a chain of elementwise ops
        gelu_tanh = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.layers = []
        for i, block in enumerate(tr.h):
            attn, mlp = block.attn, block.mlp
            scale = (1.0 / math.sqrt(attn.head_dim)) if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            act = (lambda h: F.gelu(h, approximate="tanh")) if gelu_tanh else mlp.act.forward
            self.layers.append((norm_fn(block.ln_1), kernel_2d(attn.c_attn), kernel_2d(attn.c_proj), norm_fn(block.ln_2),
                                kernel_2d(mlp.c_fc), act, kernel_2d(mlp.c_proj), attn.num_heads, attn.head_dim, scale))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        """Logits ``[rows, vocab]`` at the last position of ``input_ids`` (``[rows, t]``), whose keys
        and values are appended to ``cache``. ``mask`` covers the cached columns and these ``t``.
        The hidden states stay 2-D (``[rows * t, width]``), what the projections take."""
        rows, t = input_ids.shape
        x = self.wte(input_ids) + self.wpe(position_ids)
        bias = attention_bias(mask, t, x.dtype)
        x = x.reshape(rows * t, -1)
        bias_1 = None
        for i, (ln_1, c_attn, attn_proj, ln_2, c_fc, act, mlp_proj, heads, dim, scale) in enumerate(self.layers):
            qkv = c_attn(ln_1(x))
            if t == 1:  # one query per row: three small kernels beat the fused kernel's dispatch
                q, k, v = qkv.view(rows, 3, heads, 1, dim).unbind(1)
                keys, values = cache.write(i, k, v)
                if bias_1 is None:
                    bias_1 = _bias_3d(bias, heads, 1)
                n = keys.shape[2]
                a = decode_attention(q.reshape(rows * heads, 1, dim), keys.reshape(rows * heads, n, dim),
                                     values.reshape(rows * heads, n, dim), bias_1, scale).view(rows, heads * dim)
            else:
                q, k, v = qkv.view(rows, t, 3, heads, dim).permute(2, 0, 3, 1, 4)
                keys, values = cache.write(i, k, v)
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
                a = a.transpose(1, 2).reshape(rows * t, heads * dim)
            x = x + attn_proj(a)
            x = x + mlp_proj(act(c_fc(ln_2(x))))
        cache.advance(t)
        return self.lm_head(self.ln_f(x.view(rows, t, -1)[:, -1]))


class LlamaDecoder:
    """``LlamaForCausalLM``'s function for incremental decoding (RMSNorm, rotary positions from the
    model's own rotary module, grouped-query attention without repeating keys, SwiGLU). Head
    counts come from the projections' sizes, so models with pruned heads work too."""

    def __init__(self, model) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotate = apply_rotary_pos_emb
        inner = model.model
        self.rotary = inner.rotary_emb  # called as a module: its rope-scaling update hooks stay in force
        self.embed, self.norm, self.lm_head = inner.embed_tokens.forward, norm_fn(inner.norm), kernel_2d(model.lm_head)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            dim = attn.head_dim
            heads, kv_heads = _out_features(attn.q_proj) // dim, _out_features(attn.k_proj) // dim
            self.layers.append((norm_fn(layer.input_layernorm), kernel_2d(attn.q_proj), kernel_2d(attn.k_proj),
                                kernel_2d(attn.v_proj), kernel_2d(attn.o_proj), norm_fn(layer.post_attention_layernorm),
                                kernel_2d(mlp.gate_proj), kernel_2d(mlp.up_proj), kernel_2d(mlp.down_proj), mlp.act_fn,
                                heads, kv_heads, dim, attn.scaling))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        rows, t = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self.rotary(x, position_ids)
        bias = attention_bias(mask, t, x.dtype)
        x = x.reshape(rows * t, -1)
        bias_1 = None
        for i, (ln_1, q_proj, k_proj, v_proj, o_proj, ln_2, gate, up, down, act, heads, kv_heads, dim,
                scale) in enumerate(self.layers):
            h = ln_1(x)
            q = q_proj(h).view(rows, t, heads, dim).transpose(1, 2)
            k = k_proj(h).view(rows, t, kv_heads, dim).transpose(1, 2)
            v = v_proj(h).view(rows, t, kv_heads, dim).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            keys, values = cache.write(i, k, v)
            if t == 1:  # the query heads of a group share their keys: [rows * kv, group, dim]
                group, n = heads // kv_heads, keys.shape[2]
                if bias_1 is None:
                    bias_1 = _bias_3d(bias, kv_heads, group)
                a = decode_attention(q.reshape(rows * kv_heads, group, dim), keys.reshape(rows * kv_heads, n, dim),
                                     values.reshape(rows * kv_heads, n, dim), bias_1, scale).view(rows, heads * dim)
            else:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale,
                                                   enable_gqa=heads != kv_heads)
                a = a.transpose(1, 2).reshape(rows * t, heads * dim)
            x = x + o_proj(a)
            h = ln_2(x)
            x = x + down(act(gate(h)) * up(h))
        cache.advance(t)
        return self.lm_head(self.norm(x.view(rows, t, -1)[:, -1]))


def _out_features(layer) -> int:
    n = getattr(layer, "out_features", None)
    return int(n) if n is not None else int(layer.weight().shape[0])


def forward_once(model, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
    """One call of the model's lean decoder, built for this call (tests and one-off use)."""
    decoder = decoder_for(model)
    assert decoder is not None, f"no lean decoder for {type(model).__name__}"
    return decoder(input_ids, position_ids, mask, cache)
