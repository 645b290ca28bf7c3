"""Build a language model from a typed config and a tokenizer's vocabulary.

Architectures are ``transformers`` classes (no ``trust_remote_code``), so a saved model reloads
with ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM``. SDPA attention is requested explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import check

Arch = Literal["gpt2", "llama"]
Objective = Literal["causal", "masked"]
Preset = Literal["tiny", "small", "gpt2-124m", "custom"]

# (n_layer, n_head, n_embd)
PRESETS = {"tiny": (2, 2, 64), "small": (4, 4, 256), "gpt2-124m": (12, 12, 768)}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: Arch = "gpt2"
    objective: Objective = "causal"  # masked: BERT-style encoder with an MLM head (arch stays gpt2)
    preset: Preset = "small"
    n_layer: int | None = None  # override the preset (required for preset: custom)
    n_head: int | None = None
    n_embd: int | None = None
    n_kv_head: int | None = None  # llama: grouped-query attention (default: n_head)
    max_seq_len: int = 1024
    dropout: float = 0.0
    tie_embeddings: bool = True
    # the embedding and output matrices get rows up to a multiple of this (the tokenizer's ids are
    # unchanged; the extra rows are never a target): matmul shapes GPUs like. gpt2-124M on an H100
    # trains 1.20x faster with 50,304 rows than with 50,257 (BENCHMARKS.md). 1 = exactly the vocabulary.
    pad_vocab_multiple: int = 64

    def __post_init__(self) -> None:
        layer, head, embd = self.dims
        check(layer >= 1, f"model.n_layer must be >= 1, got {layer}")
        check(head >= 1, f"model.n_head must be >= 1, got {head}")
        check(embd >= 1 and embd % head == 0, f"model.n_embd ({embd}) must be a positive multiple of model.n_head ({head})")
        if self.arch == "llama" and self.objective == "causal":  # RoPE rotates pairs of each head's dimensions
            check((embd // head) % 2 == 0, f"model.arch llama needs an even head size: model.n_embd ({embd}) / "
                                            f"model.n_head ({head}) = {embd // head}")
        check(self.max_seq_len >= 2, f"model.max_seq_len must be >= 2, got {self.max_seq_len}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check(self.pad_vocab_multiple >= 1, f"model.pad_vocab_multiple must be >= 1, got {self.pad_vocab_multiple}")
        # no silently ignored key: a masked LM is a BERT encoder, and grouped-query attention is Llama's
        check(self.objective == "causal" or self.arch == "gpt2",
              f"model.arch {self.arch} has no masked form here: model.objective masked trains a BERT encoder "
              f"(leave model.arch at gpt2, its default)")
        check(self.n_kv_head is None or (self.arch == "llama" and self.objective == "causal"),
              f"model.n_kv_head (grouped-query attention) applies to model.arch llama with model.objective causal, "
              f"not to {'a masked BERT encoder' if self.objective == 'masked' else f'model.arch {self.arch}'}")
        if self.n_kv_head is not None:
            check(self.n_kv_head >= 1 and head % self.n_kv_head == 0, f"model.n_head ({head}) must be divisible by model.n_kv_head ({self.n_kv_head})")

    @property
    def dims(self) -> tuple[int, int, int]:
        if self.preset == "custom":
            check(None not in (self.n_layer, self.n_head, self.n_embd),
                  "model.preset custom needs model.n_layer, model.n_head and model.n_embd")
            base = (0, 0, 0)
        else:
            base = PRESETS[self.preset]
        # a given 0 is an error (checked above), not the preset's value
        return tuple(b if v is None else v for v, b in zip((self.n_layer, self.n_head, self.n_embd), base))


def hf_config(cfg: ModelConfig, vocab_size: int, pad_id: int | None, eos_id: int | None):
    import transformers

    n_layer, n_head, n_embd = cfg.dims
    if cfg.objective == "masked":
        return transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
            intermediate_size=4 * n_embd, max_position_embeddings=cfg.max_seq_len, type_vocab_size=1,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad_id or 0,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    if cfg.arch == "llama":
        hidden = int(8 * n_embd / 3)
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=(hidden + 63) // 64 * 64,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=cfg.n_kv_head or n_head,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout, rms_norm_eps=1e-5,
            tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )
    # GPT-2's GELU is the tanh approximation; transformers' "gelu_new" computes it as a chain of
    # elementwise ops in Python, "gelu_pytorch_tanh" the same function in one fused torch kernel:
    # 1.16x per training step of the small preset on one CPU thread, 1.55x for gpt2-124M in bf16
    # eager on an H200 (BENCHMARKS.md)
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=cfg.tie_embeddings,
        activation_function="gelu_pytorch_tanh",
    )


def build_model(cfg: ModelConfig, vocab_size: int, pad_id: int | None = None, eos_id: int | None = None, seed: int = 0):
    import torch
    import transformers

    m = cfg.pad_vocab_multiple
    config = hf_config(cfg, -(-vocab_size // m) * m, pad_id, eos_id)
    torch.manual_seed(seed)
    cls = transformers.AutoModelForMaskedLM if cfg.objective == "masked" else transformers.AutoModelForCausalLM
    return name_default_loss(cls.from_config(config, attn_implementation="sdpa"))


def name_default_loss(model):
    """Name the loss ``transformers`` falls back to for a model whose class name it does not map
    to one (``GPT2LMHeadModel``, ``BertLMHeadModel``: next-token cross-entropy, ``ForCausalLM``).
    The loss is the same; without the name every process that trains it logs "`loss_type=None`
    was set in the config but it is unrecognized" once, which reads like a misconfiguration."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def load_pretrained(auto, model_dir, **kwargs):
    """``auto.from_pretrained(model_dir)`` from local files, in float32 whatever dtype the directory
    was saved in. ``transformers`` 5 loads a model in its saved dtype, and most published
    checkpoints are bf16: fine-tuned in bf16, AdamW's updates below bf16's resolution (about 0.4%
    of a weight) would be rounded away, where this pipeline keeps fp32 weights and autocasts the
    matmuls (``train.precision``); evaluation, compression and serving run on CPUs, where bf16 is
    slow or emulated and int8 quantization expects fp32 layers."""
    import torch

    return auto.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32, **kwargs)


def quiet_loading() -> None:
    """Turns off ``transformers``' per-call progress bars ("Loading weights", "Writing model shards")
    in this process. Every Ray Train worker, evaluation actor and Serve replica loads or saves
    models, each printing its own bars to the job's logs, for loads that take well under a
    second; warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def num_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * d_model * seq_len (the PaLM paper's MFU
    formula). N counts the weights that multiply: every parameter except the embedding lookups
    (token, learned positions, BERT's token types), plus the output projection even when it is tied
    to the token embedding (a vocab x d_model matmul per token, about a third of gpt2-124M's compute)."""
    import torch

    c = model.config
    n_layer = getattr(c, "n_layer", None) or c.num_hidden_layers
    d = getattr(c, "n_embd", None) or c.hidden_size
    wte = model.get_input_embeddings().weight
    lookups = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = num_params(model) - sum(lookups.values())
    head = model.get_output_embeddings()
    if head is not None and head.weight is wte:  # tied: counted once in num_params, used twice
        n += wte.numel()
    return 6 * n + 12 * n_layer * d * seq_len


_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


# RoBERTa and the families built on its embeddings number positions from padding_idx + 1, so that
# of max_position_embeddings (514 for roberta-base) pad_token_id + 1 are never a token's: roberta-base
# reads 512 tokens, and a 513th indexes past the table
# (MPNet's padding index is 1 whatever its config says)
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert",
                            "longformer", "luke", "mpnet", "roberta-prelayernorm", "xmod")


def context_length(config, default: int | None = None) -> int:
    """The number of tokens a model config allows (GPT-2 ``n_positions``, Llama and BERT
    ``max_position_embeddings``, and the names other families use; RoBERTa-style position tables
    less the rows before their first position). Models with relative positions only (ALiBi:
    BLOOM, MPT without ``max_seq_len``) record none: then ``default``, and without one a
    ValueError that says so."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if key == "max_position_embeddings" and getattr(config, "model_type", "") in _POSITIONS_AFTER_PADDING:
                pad = 1 if config.model_type == "mpnet" else getattr(config, "pad_token_id", None)
                value -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
                check(value >= 1, f"the {config.model_type} model config's max_position_embeddings leaves no "
                                  f"position after its padding id {pad}")
            return value
    if default is not None:
        return default
    raise ValueError(f"the {getattr(config, 'model_type', '?')} model config names no context length (none of "
                     f"{', '.join(_CONTEXT_KEYS)}); give it explicitly")


def token_id_list(value) -> list:
    """A config's ``eos_token_id`` as a list: one id, a list of ids (Llama 3's), or none."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def is_masked_lm(config) -> bool:
    """Whether a model config describes a masked (BERT-style, bidirectional) LM. Such a model
    also loads through ``AutoModelForCausalLM`` (as ``BertLMHeadModel``) without error, but then
    reads the tokens it predicts, so every causal use has to ask first. A classifier fine-tuned
    from one (``BertForSequenceClassification``) is not a masked LM: it is a classifier
    (``checkpoint_kind``)."""
    archs = getattr(config, "architectures", None) or ()
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return True
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return False
    return getattr(config, "model_type", "") in ENCODER_TYPES and not getattr(config, "is_decoder", False)


ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "camembert", "modernbert", "mpnet")


def checkpoint_kind(model_dir) -> str | None:
    """What a saved model is, from its config's ``architectures``: "classifier" (a sequence
    classification head), "masked" (``is_masked_lm``) or "causal"; None when the config names
    no architecture."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    archs = getattr(config, "architectures", None) or ()
    if any(a.endswith("ForSequenceClassification") for a in archs):  # from a causal or a masked base
        return "classifier"
    if is_masked_lm(config):
        return "masked"
    return "causal" if archs else None


def require_classifier(model_dir, where: str) -> None:
    """A clear error when ``model_dir`` is a language model where a fine-tuned classifier is needed
    (``AutoModelForSequenceClassification`` would load it with a random head)."""
    found = checkpoint_kind(model_dir)
    if found not in ("classifier", None):
        raise ValueError(f"{where}: {model_dir} is a {found} language model, not a sequence classifier; give a "
                         f"classification fine-tune's model (or its finetune YAML)")


def require_causal(model_dir, where: str, what: str) -> None:
    """A clear error when ``model_dir`` holds a masked LM, or a sequence classifier, where
    ``what`` needs a causal LM (both load through ``AutoModelForCausalLM``: one reading the
    tokens it predicts, the other with a language-model head it never trained)."""
    import transformers

    found = checkpoint_kind(model_dir)
    if found == "masked":
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        raise ValueError(f"{where}: {model_dir} is a masked (BERT-style) language model ({config.model_type}); "
                         f"{what} needs a causal LM")
    if found == "classifier":
        raise ValueError(f"{where}: {model_dir} is a sequence classifier; {what} needs a causal LM")
