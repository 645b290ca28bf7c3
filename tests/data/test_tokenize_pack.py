"""Tokenizer round trip and packing accounting."""

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.packing import pack
from pipeline.data.shards import write_packed_shard
from pipeline.data.tokenizer import TokenizerConfig, load_backend, train_tokenizer

TEXTS = [
    "The cat sat on the mat.", "Profits rose 76% to $1.13bn (£600m).", "Ünïcödé and emoji 🚀 survive.",
    "Multiple\nlines\n\nand  spaces.", "<|user|> hello <|assistant|> hi",
] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(TEXTS), TokenizerConfig(vocab_size=400, min_frequency=1), out)
    return str(out)


def test_tokenizer_round_trip_and_hf_loading(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>" and hf.mask_token == "<|mask|>"
    for text in TEXTS[:5] + ["never seen: Zyxwvut ßç 中文"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids) == text
    assert len(hf("<|user|>", add_special_tokens=False)["input_ids"]) == 1  # chat roles are single tokens
    tok, eos = load_backend(tok_dir)
    assert eos == hf.eos_token_id
    assert tok.encode("The cat sat on the mat.").ids == hf("The cat sat on the mat.", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packing_loses_no_token(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randrange(0, 40))] for _ in range(50)]
    rows, remainder = pack(docs, eos_id=0, seq_len=seq_len)
    assert rows.shape[1] == seq_len and rows.dtype == np.int32
    assert sum(len(d) + 1 for d in docs) == rows.size + remainder and 0 <= remainder < seq_len
    flat = [t for d in docs for t in d + [0]]
    assert rows.reshape(-1).tolist() == flat[: rows.size]


def test_shard_writer_accounts_for_every_token(tok_dir, tmp_path):
    texts = TEXTS[:30]
    meta = write_packed_shard([f"d{i}" for i in range(30)], texts, ["s1"] * 20 + ["s2"] * 10, tok_dir, 16, str(tmp_path))
    table = pq.read_table(meta["path"])
    assert table.num_rows == meta["rows"] and all(len(r) == 16 for r in table.column("input_ids").to_pylist())
    assert meta["doc_tokens"] == meta["packed_tokens"] + meta["remainder"]
    tok, _ = load_backend(tok_dir)
    assert meta["doc_tokens"] == sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    assert sum(meta["source_tokens"].values()) == meta["doc_tokens"]
    again = write_packed_shard([f"d{i}" for i in range(30)], texts, ["s1"] * 30, tok_dir, 16, str(tmp_path))
    assert again["path"] == meta["path"] and len(list(tmp_path.glob("*.parquet"))) == 1  # retry-safe name


def test_a_given_tokenizer_is_copied_next_to_the_data(tok_dir, tmp_path):
    """``tokenizer.path``: a user's own tokenizer (here GPT-2's file layout, vocab.json and
    merges.txt with no tokenizer.json) is copied into the run and packs with its own ids; one
    without an end-of-text token is refused by name."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pipeline.data.tokenizer import copy_tokenizer

    bpe = json.loads(Path(tok_dir, "tokenizer.json").read_text())["model"]
    given = tmp_path / "gpt2-layout"
    given.mkdir()
    (given / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (given / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m)
                                                                    for m in bpe["merges"]) + "\n")
    (given / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                             "eos_token": "<|endoftext|>"}))
    src = AutoTokenizer.from_pretrained(str(given), local_files_only=True)
    copy_tokenizer(given, tmp_path / "copy", TokenizerConfig(path=str(given)))
    tok, eos = load_backend(str(tmp_path / "copy"))
    text = "Profits rose 76% to $1.13bn (£600m)."
    assert tok.encode(text, add_special_tokens=False).ids == src(text, add_special_tokens=False)["input_ids"]
    assert eos == src.eos_token_id

    no_eos = tmp_path / "no-eos"
    PreTrainedTokenizerFast(tokenizer_file=f"{tok_dir}/tokenizer.json").save_pretrained(str(no_eos))
    with pytest.raises(ValueError, match=r"tokenizer.path .*no eos_token"):
        copy_tokenizer(no_eos, tmp_path / "copy2", TokenizerConfig(path=str(no_eos)))


def test_packing_opens_each_document_with_bos_when_given():
    docs = [[5, 6], [], [7]]
    rows, remainder = pack(docs, eos_id=0, seq_len=3, bos_id=1)
    assert rows.reshape(-1).tolist() == [1, 5, 6, 0, 1, 0, 1, 7, 0]
    assert remainder == 0 and sum(len(d) + 2 for d in docs) == rows.size + remainder


def test_documents_open_with_bos_where_the_tokenizer_opens_every_text_with_it(tok_dir, tmp_path):
    """``document_bos`` agrees with what ``transformers`` encodes: ours and GPT-2-style tokenizers
    (BOS = EOS, or none added) give None; a Llama-style SentencePiece tokenizer gives its BOS when its
    config says ``add_bos_token`` (Llama 2's does), and so does a ``tokenizer.json`` whose
    post-processor adds it (Llama 3's); the copy the prepare stage makes keeps the answer, and its
    shards open every document with BOS, counted in the accounting."""
    import json

    import sentencepiece as spm
    from tokenizers import processors
    from transformers import AutoTokenizer

    from pipeline.data.tokenizer import copy_tokenizer, document_bos

    assert document_bos(tok_dir) is None
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    for add_bos in (True, False, None):
        sp = tmp_path / f"sp-{add_bos}"
        sp.mkdir()
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(sp / "tokenizer"), vocab_size=400,
                                       model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                       minloglevel=2)
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (sp / "tokenizer_config.json").write_text(json.dumps(config | ({} if add_bos is None else
                                                                       {"add_bos_token": add_bos})))
        opens = AutoTokenizer.from_pretrained(str(sp))("The cat")["input_ids"][0] == 1
        assert opens == bool(add_bos)
        copy_tokenizer(sp, tmp_path / f"copy-{add_bos}", TokenizerConfig(path=str(sp)))
        for where in (sp, tmp_path / f"copy-{add_bos}"):
            assert document_bos(where) == (1 if add_bos else None), (add_bos, where)
    hf = AutoTokenizer.from_pretrained(tok_dir)  # a post-processor that adds a BOS of its own
    hf.add_special_tokens({"bos_token": "<|begin|>"})
    hf._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", hf.bos_token_id)])
    hf.save_pretrained(str(tmp_path / "template"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "template"))("The cat")["input_ids"][0] == hf.bos_token_id
    assert document_bos(tmp_path / "template") == hf.bos_token_id
    copy = str(tmp_path / "copy-True")
    texts = TEXTS[:10]
    (tmp_path / "out").mkdir()
    meta = write_packed_shard([f"d{i}" for i in range(10)], texts, ["s"] * 10, copy, 8, str(tmp_path / "out"), 1)
    tok, eos = load_backend(copy)
    flat = [t for text in texts for t in [1, *tok.encode(text, add_special_tokens=False).ids, eos]]
    assert meta["doc_tokens"] == len(flat) == meta["packed_tokens"] + meta["remainder"]
    assert pq.read_table(meta["path"]).column("input_ids").to_pylist()[0] == flat[:8]
