"""Packed shards are read only by models with the tokenizer that made them."""

from __future__ import annotations

import json

import pytest

from pipeline.data.tokenizer import TokenizerConfig, train_tokenizer
from pipeline.train.data import check_same_tokenizer, prepared_tokenizer_dir

TEXTS = ["Shares in the company rose after the results.", "The team won the match in extra time."] * 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=320, min_frequency=1), root / "tokenizer")
    (root / "manifest.json").write_text(json.dumps({"tokenizer": "elsewhere/tokenizer", "shards": []}))
    return root


def test_prepared_tokenizer_is_the_outputs_own_copy(prepared):
    assert prepared_tokenizer_dir(prepared, {"tokenizer": "elsewhere/tokenizer"}) == (prepared / "tokenizer").resolve()


def test_same_tokenizer_and_one_with_added_tokens_pass(prepared, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    tok.save_pretrained(str(tmp_path / "same"))
    check_same_tokenizer(prepared, tmp_path / "same", "lm.data")
    tok.add_tokens(["<|tool|>"], special_tokens=True)  # a fine-tuned model's extra token
    tok.save_pretrained(str(tmp_path / "more"))
    check_same_tokenizer(prepared, tmp_path / "more", "lm.data")


def test_another_tokenizer_is_refused_naming_the_key(prepared, tmp_path):
    other = ["Completely different words make another vocabulary here.", "Zebras quietly juggle violet kites."] * 40
    train_tokenizer(iter(other), TokenizerConfig(vocab_size=320, min_frequency=1), tmp_path / "model")
    with pytest.raises(ValueError, match=r"eval\.lm_data .*another tokenizer"):
        check_same_tokenizer(prepared, tmp_path / "model", "eval.lm_data (model base)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer"):
        check_same_tokenizer(prepared, tmp_path / "empty", "lm.data")
