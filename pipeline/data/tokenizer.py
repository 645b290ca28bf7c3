"""Byte-level BPE tokenizer (GPT-2 style): trained with Hugging Face ``tokenizers`` on the train
split, or loaded from a local directory; saved in Hugging Face format so that
``AutoTokenizer.from_pretrained(dir)`` loads it offline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from pipeline.config import check

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    path: str | None = None  # load this local HF tokenizer instead of training one
    vocab_size: int = 8192
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    # chat roles for fine-tuning and a mask token for the masked-LM objective
    extra_special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|mask|>"]
    )
    max_train_docs: int | None = None  # cap on documents fed to the trainer (None: the whole train split)

    def __post_init__(self) -> None:
        check(self.vocab_size >= 300, f"tokenizer.vocab_size must be >= 300 (256 bytes + specials), got {self.vocab_size}")
        check(self.min_frequency >= 1, f"tokenizer.min_frequency must be >= 1, got {self.min_frequency}")
        check(bool(self.eos_token), "tokenizer.eos_token must be set")
        check(self.max_train_docs is None or self.max_train_docs >= 1,
              f"tokenizer.max_train_docs must be >= 1 or null (the whole train split), got {self.max_train_docs}")
        if self.path is not None:
            check(bool(self.path) and Path(self.path).is_dir(), f"tokenizer.path is not a directory: {self.path}")

    @property
    def special_tokens(self) -> list[str]:
        tokens = [self.eos_token, self.pad_token, *self.extra_special_tokens]
        return list(dict.fromkeys(t for t in tokens if t))


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path, length: int | None = None):
    """Train a byte-level BPE on ``texts`` and save it (HF format) to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return save_hf_tokenizer(tok, cfg, out_dir)


def save_hf_tokenizer(tok, cfg: TokenizerConfig, out_dir: str | Path):
    from transformers import PreTrainedTokenizerFast

    extra = [t for t in cfg.extra_special_tokens if t]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=cfg.eos_token,
        bos_token=cfg.eos_token,
        unk_token=None,
        pad_token=cfg.pad_token or None,
        mask_token="<|mask|>" if "<|mask|>" in extra else None,
        additional_special_tokens=[t for t in extra if t != "<|mask|>"],
        clean_up_tokenization_spaces=False,
    )
    hf.model_max_length = 1_000_000_000
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    # transformers 5 records its internal class name; older releases (and other loaders) know the
    # public PreTrainedTokenizerFast, which transformers 5 loads as well
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    return hf


def copy_tokenizer(src: str | Path, out_dir: str | Path, cfg: TokenizerConfig):
    """Load a local HF tokenizer, check it has the end-of-text token, and save a copy next to the data."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    if not hf.is_fast:
        raise ValueError(f"tokenizer.path {src}: a fast (tokenizers-backed) tokenizer is required")
    if hf.eos_token is None:
        raise ValueError(f"tokenizer.path {src}: the tokenizer has no eos_token; packing needs one")
    hf.save_pretrained(str(out_dir))
    return hf


def document_bos(tokenizer_dir: str | Path) -> int | None:
    """The BOS id each packed document opens with: the tokenizer's, where it opens every text
    with it as ``transformers`` encodes (Llama's and Mistral's do: a model pretrained on their
    shards saw BOS at every document's start, and so must one trained further), else None (ours,
    GPT-2's: documents are only separated by EOS). BOS equal to EOS is None: EOS already
    separates the documents."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    bos = hf.bos_token_id
    if bos is None or bos == hf.eos_token_id:
        return None
    return bos if hf("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


@lru_cache(maxsize=4)
def load_backend(tokenizer_dir: str):
    """(tokenizers.Tokenizer, eos id) from a saved HF tokenizer directory, cached per process."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    eos = config.get("eos_token")
    if eos is None and (Path(tokenizer_dir) / "special_tokens_map.json").exists():  # older transformers
        eos = json.loads((Path(tokenizer_dir) / "special_tokens_map.json").read_text()).get("eos_token")
    assert eos is not None, f"{tokenizer_dir} names no eos_token"
    eos = eos["content"] if isinstance(eos, dict) else eos
    eos_id = tok.token_to_id(eos)
    assert eos_id is not None, f"eos token {eos!r} is not in the vocabulary of {tokenizer_dir}"
    return tok, eos_id
