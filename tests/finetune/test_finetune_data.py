"""SFT loss mask and chat template; classification data with bad rows."""

import json
from pathlib import Path

import pytest

from pipeline.data.tokenizer import TokenizerConfig, train_tokenizer
from pipeline.finetune.classify_data import encode_classification, read_labeled
from pipeline.finetune.sft import CHAT_TEMPLATE, load_chat_examples, record_to_messages, tokenize_chat


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = ["How do I reset my password?", "Click on forgot password and follow the e-mail.", "Hello there"] * 30
    hf = train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400, min_frequency=1), out)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def test_sft_loss_mask_covers_exactly_the_assistant_tokens(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I reset my password?"},
                {"role": "assistant", "content": "Click on forgot password."}, {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "Hello there"}]
    ex = tokenize_chat(messages, tok, 128)
    n = sum(ex["attention_mask"])
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex["input_ids"][:n]) == rendered  # the mask is built on the template's exact tokens
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ex["input_ids"][:n]
    learned = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert [l for l in ex["labels"] if l != -100] == learned
    assert tok.decode(learned) == "Click on forgot password.<|endoftext|>Hello there<|endoftext|>"
    assert ex["labels"][n:] == [-100] * (128 - n) and ex["input_ids"][n:] == [tok.pad_token_id] * (128 - n)


def test_openai_chat_records_parts_developer_and_weight(tok):
    """OpenAI's chat fine-tuning records: content as a list of text parts (joined with newlines, as
    the Serve endpoint joins them), the "developer" role (system), and assistant messages with
    "weight": 0, which stay in the context but are not learned."""
    conv = record_to_messages({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Hello there", "weight": 0},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Click on forgot password.", "weight": 1}]}, "here")
    assert conv[0] == {"role": "system", "content": "Be\nbrief."} and conv[2]["learn"] is False
    ex = tokenize_chat(conv, tok, 128)
    assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == \
        "Click on forgot password.<|endoftext|>"
    assert "Hello there" in tok.decode(ex["input_ids"])
    for bad, reason in [({"role": "user", "content": "a", "weight": 0}, "on a user message"),
                        ({"role": "assistant", "content": "a", "weight": 0.5}, "'weight' must be 0 or 1"),
                        ({"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}, "not a text part"),
                        ({"role": "assistant", "content": []}, "a list of text parts")]:
        with pytest.raises(ValueError, match=reason):
            record_to_messages({"messages": [{"role": "user", "content": "q"}, bad]}, "here")
    with pytest.raises(ValueError, match="no assistant message to learn from"):
        record_to_messages({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "weight": 0}]}, "here")


def test_sft_truncates_to_max_len(tok):
    ex = tokenize_chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there " * 50}], tok, 16)
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"]) == 16
    assert any(t != -100 for t in ex["labels"][1:])
    # a prompt that fills the window leaves nothing to learn: refused (a batch of such rows is a NaN loss)
    with pytest.raises(ValueError, match=r"no assistant token within data.max_seq_len \(16 of the conversation's \d+"):
        tokenize_chat([{"role": "user", "content": "Hello there " * 50}, {"role": "assistant", "content": "Hi"}], tok, 16)


def test_chat_records_and_bad_ones(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        "{broken",
        json.dumps({"text": "no chat here"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    bad = []
    convs = list(load_chat_examples(str(path), bad))
    assert len(convs) == 2 and convs[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert len(bad) == 4 and all(b["where"].startswith(str(path)) and b["reason"] for b in bad)
    with pytest.raises(ValueError, match="not found"):
        list(load_chat_examples(str(tmp_path / "missing.jsonl"), []))
    # a record of a known shape with a field missing or of another type says which
    for rec, reason in [({"prompt": 1, "completion": "x"}, "got prompt a number and completion a string"),
                        ({"prompt": "q", "completion": None}, "got prompt a string and completion null"),
                        ({"instruction": "q"}, r"'instruction' and 'output' must both be strings \(Alpaca\); got "
                                               "instruction a string and output missing"),
                        ({"question": "q", "answer": "a"}, r"got the keys \['answer', 'question'\]"),
                        ({"prompt": "q", "completion": " "}, "an empty assistant answer"),
                        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
                         "an empty assistant answer")]:
        with pytest.raises(ValueError, match=reason):
            record_to_messages(rec, "here")
    assert record_to_messages({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                                                "weight": 0},
                                            {"role": "user", "content": "r"}, {"role": "assistant", "content": "s"}]},
                              "here")[1] == {"role": "assistant", "content": "", "learn": False}


def test_alpaca_records_json_arrays_and_conversational_prompt_completion(tmp_path):
    """Alpaca-style datasets are one JSON array of {instruction, input, output}: each becomes a
    user turn (instruction, then the input when there is one) and the assistant's output; the
    conversational prompt-completion form (lists of messages) is read too; a classification
    file may be a JSON array as well."""
    from pipeline.finetune.classify_data import read_labeled

    records = [{"instruction": "Add one.", "input": "41", "output": "42"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
               {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
               {"instruction": "No output."}, {"instruction": "x", "input": 3, "output": "y"}, "a string"]
    (tmp_path / "alpaca.json").write_text(json.dumps(records, indent=2))
    bad = []
    convs = list(load_chat_examples(str(tmp_path / "alpaca.json"), bad))
    assert convs == [[{"role": "user", "content": "Add one.\n\n41"}, {"role": "assistant", "content": "42"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}],
                     [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert [b["where"] for b in bad] == [f"{tmp_path / 'alpaca.json'}[{i}]" for i in (3, 4, 5)]
    assert "Alpaca" in bad[0]["reason"] and "'input' must be a string" in bad[1]["reason"]
    (tmp_path / "broken.json").write_text('[{"prompt": "p", "completion": "c"}')
    bad = []
    # a cut-off array (streamed): the elements before the cut are read, the break is reported
    assert list(load_chat_examples(str(tmp_path / "broken.json"), bad)) == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]]
    assert "the JSON array breaks" in bad[0]["reason"] and bad[0]["where"].endswith("broken.json[1:]")
    (tmp_path / "labeled.json").write_text(json.dumps([{"text": "t1", "label": "a"}, {"text": "t2", "label": "b"}, 7]))
    bad = []
    assert read_labeled(str(tmp_path / "labeled.json"), "text", "label", bad) == [("t1", "a"), ("t2", "b")]
    assert len(bad) == 1 and "not an object" in bad[0]["reason"]


def test_chat_and_labeled_data_from_uris_and_compressed_files(tmp_path):
    """data.train named by a URI, gzipped: read as the local file is; a line or element that is
    not UTF-8 is one rejected record, the rest is read."""
    import gzip

    from pipeline.finetune.classify_data import read_labeled

    chat = b'{"prompt": "Hi?", "completion": "Hello."}\n{"prompt": "caf\xe9", "completion": "x"}\n'
    (tmp_path / "chat.jsonl.gz").write_bytes(gzip.compress(chat))
    bad: list = []
    assert list(load_chat_examples(f"file://{tmp_path}/chat.jsonl.gz", bad)) == [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]]
    assert [b["reason"] for b in bad] == ["not valid UTF-8 (save the file as UTF-8)"]
    (tmp_path / "lab.json").write_bytes(b'[{"text": "t1", "label": "a"}, {"text": "caf\xe9", "label": "b"}, {"text": "t3", "label": "c"}]')
    bad = []
    assert read_labeled(f"file://{tmp_path}/lab.json", "text", "label", bad) == [("t1", "a"), ("t3", "c")]
    assert bad[0]["where"].endswith("lab.json[1]")
    with pytest.raises(ValueError, match="data file not found"):
        read_labeled(f"file://{tmp_path}/nothing.csv", "text", "label", [])


def test_chat_and_labeled_data_from_directories_and_globs(tmp_path):
    """A directory of shards (as datasets' to_parquet / to_json or Spark write them) or a glob is
    read file by file in path order, as a prepare source is; a file of another kind there is a
    rejected record, not silently dropped; a glob that matches nothing is an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.finetune.classify_data import read_labeled

    shards = tmp_path / "labeled"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["t0", "t1"], "label": ["a", "b"]}), shards / "train-00000-of-00002.parquet")
    (shards / "train-00001-of-00002.jsonl").write_text('{"text": "t2", "label": "a"}\n')
    (shards / "_SUCCESS").write_text("")
    bad: list = []
    assert read_labeled(str(shards), "text", "label", bad) == [("t0", "a"), ("t1", "b"), ("t2", "a")]
    assert [b["where"] for b in bad] == [str(shards / "_SUCCESS")] and "skipped" in bad[0]["reason"]
    bad = []
    assert read_labeled(f"file://{shards}/*.parquet", "text", "label", bad) == [("t0", "a"), ("t1", "b")] and not bad
    with pytest.raises(ValueError, match="no files there"):
        read_labeled(str(shards / "*.csv"), "text", "label", [])
    chats = tmp_path / "chats"
    chats.mkdir()
    for i in range(2):
        (chats / f"part-{i}.jsonl").write_text(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n")
    bad = []
    assert [c[0]["content"] for c in load_chat_examples(str(chats / "part-*.jsonl"), bad)] == ["q0", "q1"] and not bad
    assert len(list(load_chat_examples(str(chats), bad))) == 2


def test_chatterbot_conversations():
    bad = []
    convs = list(load_chat_examples("chatterbot", bad))
    assert len(convs) > 1500 and all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)
    assert bad and all(b["reason"] for b in bad)


def test_chat_data_from_parquet_hf_datasets_and_sharegpt(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "r"}]}
    pq.write_table(pa.Table.from_pylist([good, good]), tmp_path / "chat.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([good]),
                          "test": datasets.Dataset.from_list([good])}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "share.jsonl").write_text(json.dumps(share) + "\n" + json.dumps(["not", "an object"]) + "\n" +
                                          json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    bad = []
    assert list(load_chat_examples(str(tmp_path / "chat.parquet"), bad)) == [good["messages"]] * 2 and not bad
    assert list(load_chat_examples(str(tmp_path / "hf"), bad)) == [good["messages"]] and not bad  # the train split
    convs = list(load_chat_examples(str(tmp_path / "share.jsonl"), bad))
    assert convs == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "r"}]]
    assert [b["where"].rsplit(":", 1)[1] for b in bad] == ["2", "3"] and "not an object" in bad[0]["reason"]


def test_labeled_data_and_bad_rows(tmp_path, tok):
    path = tmp_path / "l.csv"
    path.write_text("text,label\nHello there,a\n,b\nHow do I reset my password?,b\nno label,\n")
    bad = []
    pairs = read_labeled(str(path), "text", "label", bad)
    assert pairs == [("Hello there", "a"), ("How do I reset my password?", "b")]
    assert [b["reason"] for b in bad] == ["missing or non-string text", "missing label"]
    assert [b["where"] for b in bad] == [f"{path}: record 2", f"{path}: record 4"]  # from 1, the header not counted
    rows = encode_classification([t for t, _ in pairs], [y for _, y in pairs], {"a": 0, "b": 1}, tok, 8)
    assert [r["labels"] for r in rows] == [0, 1] and all(len(r["input_ids"]) == 8 for r in rows)
    with pytest.raises(ValueError, match="no column 'body'"):
        read_labeled(str(path), "body", "label", [])
    # a row in another encoding is rejected with that reason (pyarrow read the whole column as
    # binary and every row was "missing text"); TSV by its name
    (tmp_path / "mixed.csv").write_bytes('text,label\n"Gar\xe7on",a\nFine text,b\nA label,caf\xe9\n'.encode("latin-1"))
    bad = []
    assert read_labeled(str(tmp_path / "mixed.csv"), "text", "label", bad) == [("Fine text", "b")]
    assert len(bad) == 2 and all("not valid UTF-8" in b["reason"] for b in bad)  # in the text, in the label
    # a record with more values than the header has columns is rejected (an unquoted comma in the
    # text: which part is the label is unknown), not read as its first columns
    (tmp_path / "extra.csv").write_text("text,label\nOne, two,a\nThree,b\n")
    bad = []
    assert read_labeled(str(tmp_path / "extra.csv"), "text", "label", bad) == [("Three", "b")]
    assert bad == [{"where": f"{tmp_path / 'extra.csv'}: record 1", "reason": "1 more value(s) than the header has columns"}]
    (tmp_path / "t.tsv").write_text("text\tlabel\nTab, separated\ta\n")
    assert read_labeled(str(tmp_path / "t.tsv"), "text", "label", []) == [("Tab, separated", "a")]
    with pytest.raises(ValueError, match="not found"):
        read_labeled(str(tmp_path / "nope.csv"), "text", "label", [])
    # JSONL: a line that does not parse is counted, not fatal; nested fields by dotted name
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"doc": {"body": "Hello there"}, "meta": {"topic": "a"}}\n{broken\n[1, 2]\n'
                  '{"doc": {"body": "Thanks"}, "meta": {}}\n')
    bad = []
    assert read_labeled(str(jl), "doc.body", "meta.topic", bad) == [("Hello there", "a")]
    # each rejected row is named by its own line, after lines that did not parse too
    assert [b["where"].rsplit(":", 1)[1] for b in bad] == ["2", "3", "4"]
    assert [b["reason"].split(" (")[0] for b in bad] == ["not valid JSON", "a JSON list, not an object", "missing label"]
    with pytest.raises(ValueError, match="no column 'doc.title'"):
        read_labeled(str(jl), "doc.title", "meta.topic", [])
    from pipeline.finetune.classify_data import read_labeled_rows

    jl.write_text('{"t": "Hello there", "y": "a", "meta": {"src": "web"}}\n{"t": "Thanks", "y": "b"}\n')
    assert [r["group"] for r in read_labeled_rows(str(jl), "t", "y", [], "meta.src")] == ["web", None]
    # a label that is not one value (a list, an object) or is NaN is rejected, not made a class;
    # numbers are classes by their text
    jl.write_text('{"t": "One", "y": 1}\n{"t": "Two", "y": ["a", "b"]}\n{"t": "Three", "y": {"k": 1}}\n'
                  '{"t": "Four", "y": NaN}\n{"t": "Five", "y": true}\n')
    bad = []
    assert read_labeled(str(jl), "t", "y", bad) == [("One", "1"), ("Five", "true")]
    assert [b["reason"] for b in bad] == ["the label is a list, not one value (a string or a number)",
                                          "the label is a dict, not one value (a string or a number)", "missing label"]


def test_a_class_is_the_same_however_a_file_spells_it(tmp_path):
    """pandas writes an integer label column that has a missing value as floats (3.0), in CSV and
    in Parquet: a train file then says 3.0 where a test file says 3. Both are class "3", as are
    JSON's 3 and a CSV's " 3" after a comma; other values keep their text."""
    import pandas as pd

    from pipeline.finetune.classify_data import label_name

    pd.DataFrame({"text": ["a", "b", "c"], "label": [3, None, 1]}).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"text": ["a", "b", "c"], "label": [3, None, 1]}).to_csv(tmp_path / "train.csv", index=False)
    assert "3.0" in (tmp_path / "train.csv").read_text()
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": 3}\n{"text": "c", "label": 1.0}\n')
    (tmp_path / "spaced.csv").write_text('text, label\na, 3\nc, " 1"\n')  # a header and values after ", "
    for name, label in [("train.parquet", "label"), ("train.csv", "label"), ("test.jsonl", "label"),
                        ("spaced.csv", "label")]:
        bad = []
        assert [y for _, y in read_labeled(str(tmp_path / name), "text", label, bad)] == ["3", "1"], name
        assert len(bad) == (name.startswith("train")), name  # the missing label is counted
    assert [label_name(v) for v in ["sports ", "03", "2.5", 2.5, "v1.0", "-2.00", False, 12.0]] == \
        ["sports", "03", "2.5", "2.5", "v1.0", "-2", "false", "12"]


def test_labeled_data_from_a_saved_hf_dataset_dict(tmp_path, tok):
    """A DatasetDict (train / validation / an empty test) with a ClassLabel column: its splits act as
    a prepare output's labeled splits (validation -> val, the empty one left out) and the labels
    are the class names, not the stored integers."""
    import datasets

    from pipeline.finetune.finetune import labeled_splits

    features = datasets.Features({"body": datasets.Value("string"), "topic": datasets.ClassLabel(names=["sport", "tech"])})
    part = datasets.Dataset.from_dict({"body": ["Goal in the last minute.", "New chip released."], "topic": [0, 1]},
                                      features=features)
    datasets.DatasetDict({"train": part, "validation": part.select([1]), "test": part.select([])}).save_to_disk(
        str(tmp_path / "dd"))
    files = labeled_splits(str(tmp_path / "dd"))
    assert sorted(files) == ["train", "val"]
    assert read_labeled(files["train"], "body", "topic", []) == [("Goal in the last minute.", "sport"),
                                                                 ("New chip released.", "tech")]
    assert read_labeled(files["val"], "body", "topic", []) == [("New chip released.", "tech")]
    # ClassLabel's -1 is Hugging Face's "no label" (GLUE's test splits): counted as missing, not a class "-1"
    datasets.Dataset.from_dict({"body": ["Goal!", "Unlabeled text."], "topic": [0, -1]}, features=features).save_to_disk(
        str(tmp_path / "unlabeled"))
    bad = []
    assert read_labeled(str(tmp_path / "unlabeled"), "body", "topic", bad) == [("Goal!", "sport")]
    assert bad == [{"where": f"{tmp_path / 'unlabeled'}: row 1", "reason": "missing label"}]
    # through build_examples: an explicit data.val wins over the DatasetDict's validation split
    from pipeline.finetune.finetune import FinetuneConfig, FinetuneDataConfig, build_examples

    (tmp_path / "val.jsonl").write_text('{"body": "Match report.", "topic": "sport"}\n{"body": "GPU news.", "topic": "tech"}\n')
    for val, n_val in ((None, 1), (str(tmp_path / "val.jsonl"), 2)):
        cfg = FinetuneConfig(task="classification", base_model="unused", data=FinetuneDataConfig(
            train=str(tmp_path / "dd"), val=val, text_field="body", label_field="topic", max_seq_len=16))
        rows, info, bad = build_examples(cfg, tok)
        assert (len(rows["train"]), len(rows["val"]), bad) == (2, n_val, [])


def test_sft_from_a_dataset_dict_uses_its_validation_split(tmp_path, tok):
    import datasets

    from pipeline.finetune.finetune import FinetuneConfig, FinetuneDataConfig, build_examples

    def part(n):
        return datasets.Dataset.from_dict({"prompt": [f"How do I reset password {i}?" for i in range(n)],
                                           "completion": ["Click on forgot password."] * n})
    datasets.DatasetDict({"train": part(6), "validation": part(2)}).save_to_disk(str(tmp_path / "chat"))
    cfg = FinetuneConfig(task="sft", base_model="unused", data=FinetuneDataConfig(train=str(tmp_path / "chat"), max_seq_len=64))
    rows, _, bad = build_examples(cfg, tok)
    assert (len(rows["train"]), len(rows["val"]), bad) == (6, 2, [])


def test_classifier_texts_end_with_eos_after_truncation_and_reload(tmp_path, tok):
    import copy

    from transformers import AutoTokenizer

    from pipeline.finetune.classify_data import end_with_eos

    t = copy.deepcopy(tok)
    plain = t("How do I reset my password?", add_special_tokens=False)["input_ids"]
    assert end_with_eos(t)
    assert t("How do I reset my password?")["input_ids"] == plain + [t.eos_token_id]
    cut = t("How do I reset my password? " * 20, truncation=True, max_length=6)["input_ids"]
    assert len(cut) == 6 and cut[-1] == t.eos_token_id and cut[:5] == plain[:5]
    rows = encode_classification(["Hello there"], ["a"], {"a": 0}, t, 8)
    n = sum(rows[0]["attention_mask"])
    assert rows[0]["input_ids"][n - 1] == t.eos_token_id and rows[0]["input_ids"][n:] == [t.pad_token_id] * (8 - n)
    t.save_pretrained(str(tmp_path / "t"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert again("Hello there")["input_ids"][-1] == t.eos_token_id
    assert end_with_eos(again)  # idempotent: already ends with EOS
    assert again("Hello there")["input_ids"].count(t.eos_token_id) == 1


def test_finetune_dropout_overrides_only_keys_the_base_has(tmp_path):
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, dropout_overrides

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                      "attn_pdrop": 0.0, "n_embd": 64}))
    assert dropout_overrides(tmp_path, 0.1) == {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    assert dropout_overrides(tmp_path, None) == {}
    with pytest.raises(ValueError, match="dropout"):
        from_dict(FinetuneConfig, {"task": "classification", "base_model": "m", "data": {"train": "x"}, "dropout": 1.5})
    with pytest.raises(ValueError, match="run.checkpoint_metric"):
        from_dict(FinetuneConfig, {"task": "sft", "base_model": "m", "data": {"train": "x"},
                                   "run": {"checkpoint_metric": "val_accuracy"}})


def test_bad_checkpoint_metric_names_the_key():
    from pipeline.config import from_dict
    from pipeline.train.ray_train import RunConfigCfg

    with pytest.raises(ValueError, match="checkpoint_metric"):
        from_dict(RunConfigCfg, {"checkpoint_metric": "val_f1"})


def test_classification_windows_cover_a_long_text_and_keep_its_label(tok):
    import copy

    from pipeline.finetune.classify_data import Windowing, encode_windows, end_with_eos

    t = copy.deepcopy(tok)
    assert end_with_eos(t)
    long = " ".join(f"Hello there number {i}." for i in range(12))
    body = t(long, add_special_tokens=False)["input_ids"]
    w = Windowing(16, windows=3, overlap=4)
    rows = encode_classification([long, "Hello there"], ["a", "b"], {"a": 0, "b": 1}, t, w)
    assert [r["labels"] for r in rows] == [0, 0, 0, 1]  # three windows of the long text, one of the short
    windows = [r["input_ids"][:sum(r["attention_mask"])] for r in rows[:3]]
    assert all(len(x) == 16 and x[-1] == t.eos_token_id for x in windows)
    assert windows[0][:15] == body[:15]
    assert windows[1][:4] == windows[0][11:15] and windows[1][:15] == body[11:26]  # 4 tokens shared
    assert windows[2][:15] == body[22:37]
    one, source = encode_windows(t, [long, "Hello there"], Windowing(16))
    assert source == [0, 1] and one["input_ids"][0][:15] == body[:15]


def test_windowing_config_errors_name_the_key():
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig

    base = {"task": "classification", "base_model": "m", "data": {"train": "x.jsonl", "max_seq_len": 32}}
    for data, key in [({"windows": 0}, "data.windows"), ({"window_overlap": 16}, "data.window_overlap"),
                      ({"chat_template": "chatml"}, "data.chat_template"),
                      ({"window_training": "text"}, "data.window_training"),
                      ({"window_pooling": "max"}, "data.window_pooling")]:
        with pytest.raises(ValueError, match=key):
            from_dict(FinetuneConfig, {**base, "data": {**base["data"], **data}})
    article = {**base["data"], "windows": 4, "window_training": "article"}
    with pytest.raises(ValueError, match="data.window_training article applies to task classification only"):
        from_dict(FinetuneConfig, {**base, "task": "sft", "data": article})
    with pytest.raises(ValueError, match="data.window_training article trains with scaling.strategy ddp only"):
        from_dict(FinetuneConfig, {**base, "data": article, "scaling": {"strategy": "fsdp"}})
    # a key the task does not read is an error, not silently ignored
    sft = {**base, "task": "sft", "data": {"train": "chat.jsonl"}}
    for data, message in [({"text_field": "body"}, "data.text_field applies to task classification only"),
                          ({"windows": 4, "window_overlap": 8}, "data.windows, data.window_overlap apply to task classification"),
                          ({"label_field": "y"}, "data.label_field applies"), ({"window_pooling": "logits"}, "data.window_pooling"),
                          ({"test": "t.jsonl"}, "data.test applies to task classification only")]:
        with pytest.raises(ValueError, match=message):
            from_dict(FinetuneConfig, {**sft, "data": {**sft["data"], **data}})
    from_dict(FinetuneConfig, {**sft, "data": {**sft["data"], "chat_template": "builtin", "val": "v.jsonl"}})
    with pytest.raises(ValueError, match="data.chat_template applies to task sft only"):
        from_dict(FinetuneConfig, {**base, "data": {**base["data"], "chat_template": "builtin"}})


def test_a_relative_base_model_path_is_made_absolute(tmp_path, monkeypatch):
    # Ray Train workers run elsewhere: a relative directory would be taken for a model hub id there
    from pipeline.finetune.finetune import resolve_model_dir

    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("models/m") == tmp_path / "models" / "m"
    assert resolve_model_dir("models/m").is_absolute()


def test_a_finetune_run_stamps_its_base_and_data_a_prepare_config_by_its_manifest(tmp_path):
    """What a rerun compares (pipeline/stamps.py): a prepare config stands for its output's
    manifest, which a new prepare run (another directory) or a rerun of it replaces."""
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, _inputs
    from pipeline.train.data import resolve_prepared

    prepare_yaml = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "prepare_demo.yaml"
    cfg = from_dict(FinetuneConfig, {"task": "classification", "base_model": str(tmp_path), "data": {
        "train": str(prepare_yaml), "val": "s3://b/v.jsonl", "test": str(tmp_path / "t.jsonl")}})
    assert _inputs(cfg, tmp_path) == {"base_model": str(tmp_path), "data.val": "s3://b/v.jsonl",
                                      "data.train": str(resolve_prepared(str(prepare_yaml)) / "manifest.json"),
                                      "data.test": str(tmp_path / "t.jsonl")}


def _no_pad_model(tmp_path, arch: str = "gpt2"):
    """A GPT-2 (or Llama) and its tokenizer the way hub ones come: no padding token, and exactly
    as many embedding rows as tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "<|endoftext|> [UNK] shares rose fell the match was won lost a goal market".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]")
    assert tok.pad_token_id is None
    if arch == "llama":  # its embedding is built with padding_idx = pad_token_id
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=32, eos_token_id=0,
                                             bos_token_id=0, pad_token_id=None))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                           eos_token_id=0, bos_token_id=0))
    model.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    return tok


@pytest.mark.parametrize("arch,pads_with_eos", [("gpt2", False), ("llama", False), ("gpt2", True)])
def test_classifier_from_a_base_without_padding_token(tmp_path, arch, pads_with_eos):
    """A base whose tokenizer has no padding token (GPT-2's, Llama's), or pads with its EOS (Qwen2's),
    gets one of its own, the embeddings grow to cover it, and a padded row is classified from its
    EOS, as it is alone (padding with EOS, the classifier would read the token before it)."""
    import torch

    from pipeline.finetune.classify_data import Windowing, end_with_eos, ensure_pad_token
    from pipeline.finetune.finetune import setup_finetune

    tok = _no_pad_model(tmp_path, arch)
    tok.padding_side = "left"
    if pads_with_eos:
        tok.pad_token = tok.eos_token
        tok.save_pretrained(str(tmp_path / "base"))
        assert tok.pad_token_id == tok.eos_token_id
    assert end_with_eos(tok) and ensure_pad_token(tok)
    assert tok.pad_token_id == len(tok) - 1 and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "right"
    assert not ensure_pad_token(tok)  # idempotent
    tok.save_pretrained(str(tmp_path / "tok"))
    rows = encode_classification(["shares rose", "the match was won by a goal"], ["money", "sport"],
                                 {"money": 0, "sport": 1}, tok, 12)
    assert rows[0]["input_ids"][2:] == [tok.eos_token_id] + [tok.pad_token_id] * 9
    config = {"base_model": str(tmp_path / "base"), "tokenizer_dir": str(tmp_path / "tok"), "loop": {"seed": 0},
              "task": "classification", "label2id": {"money": 0, "sport": 1}, "windowing": [12, 1, 0]}
    model, _, loaded_tok, _ = setup_finetune(config)
    assert model.get_input_embeddings().num_embeddings == len(loaded_tok) == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    model.eval()
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        padded = model(**batch).logits[0]
        alone = model(input_ids=torch.tensor([rows[0]["input_ids"][:3]])).logits[0]
    torch.testing.assert_close(padded, alone)


def test_a_base_saved_in_bf16_is_trained_evaluated_and_served_in_fp32(tmp_path):
    """Most published checkpoints are bf16, and ``transformers`` 5 loads a model in its saved dtype:
    fine-tuning would keep bf16 weights (AdamW's small updates rounded away: SFT val loss 4.581
    against 4.480 from the same base in the demo's run, BENCHMARKS.md), and CPU evaluation and
    serving would run bf16. Every loader gives fp32 weights; the fine-tuned model is saved in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.compress.quantize import load_model
    from pipeline.evaluate.lm import load_lm
    from pipeline.finetune.classify_data import ensure_pad_token
    from pipeline.finetune.finetune import setup_finetune

    tok = _no_pad_model(tmp_path)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).parameters()} == {torch.bfloat16}
    ensure_pad_token(tok)
    tok.save_pretrained(str(tmp_path / "tok"))
    common = {"base_model": str(tmp_path / "base"), "tokenizer_dir": str(tmp_path / "tok"), "loop": {"seed": 0}}
    sft, _, _, _ = setup_finetune({**common, "task": "sft"})
    classifier, _, _, _ = setup_finetune({**common, "task": "classification", "label2id": {"money": 0, "sport": 1},
                                          "windowing": [12, 1, 0]})
    lm, _, _ = load_lm(str(tmp_path / "base"))
    for model in (sft, classifier, lm, load_model(tmp_path / "base")):
        assert {p.dtype for p in model.parameters()} == {torch.float32}, type(model).__name__
    classifier.save_pretrained(str(tmp_path / "classifier"))
    tok.save_pretrained(str(tmp_path / "classifier"))
    assert {p.dtype for p in load_model(tmp_path / "classifier", "classifier").parameters()} == {torch.float32}


def test_a_sentencepiece_llama_base_fine_tunes_and_packs(tmp_path):
    """A Llama-2-style base whose tokenizer is only ``tokenizer.model`` (SentencePiece, no
    tokenizer.json): it loads (``sentencepiece`` is a dependency; without it transformers asks
    for tiktoken), fine-tunes a chat model with role tokens added, and as ``tokenizer.path`` of the
    prepare stage packs with its own ids."""
    import json

    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokenizer import TokenizerConfig, copy_tokenizer, load_backend
    from pipeline.finetune.finetune import setup_finetune
    from pipeline.finetune.sft import prepare_chat_tokenizer

    base = tmp_path / "base"
    base.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["How do I reset my password? Click on forgot password.", "Shares rose as the market "
                                  "fell.", "The match was won by a late goal."] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(base / "tokenizer"), vocab_size=330,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   minloglevel=2)
    (base / "tokenizer.vocab").unlink()
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    assert tok.is_fast and tok.eos_token_id == 2 and tok.decode(tok("Shares rose.", add_special_tokens=False)
                                                                  ["input_ids"]) == "Shares rose."
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(str(base))
    prepare_chat_tokenizer(tok)
    tok.save_pretrained(str(tmp_path / "tok"))
    model, _, _, _ = setup_finetune({"base_model": str(base), "tokenizer_dir": str(tmp_path / "tok"),
                                     "loop": {"seed": 0}, "task": "sft"})
    ex = tokenize_chat([{"role": "user", "content": "How do I reset my password?"},
                        {"role": "assistant", "content": "Click on forgot password."}], tok, 64)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert torch.isfinite(model(**{k: torch.tensor([ex[k]]) for k in ("input_ids", "attention_mask", "labels")}).loss)
    copy_tokenizer(base, tmp_path / "copy", TokenizerConfig(path=str(base)))
    backend, eos = load_backend(str(tmp_path / "copy"))
    assert eos == 2 and backend.encode("Shares rose.", add_special_tokens=False).ids == \
        AutoTokenizer.from_pretrained(str(base))("Shares rose.", add_special_tokens=False)["input_ids"]


def test_perplexity_of_texts_with_a_tokenizer_without_padding(tmp_path):
    """lm.text_file evaluation of a hub-style causal LM (no padding token, left padding set):
    batched scores equal each text scored alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.evaluate.lm import lm_metrics_from_texts

    tok = _no_pad_model(tmp_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    texts = ["shares rose", "the match was won by a goal", "the market fell"]
    batched = lm_metrics_from_texts(model, tok, texts, 32, batch_size=3)
    alone = [lm_metrics_from_texts(model, tok, [t], 32) for t in texts]
    assert tok.pad_token_id is None and tok.padding_side == "left"  # the caller's tokenizer is untouched
    nll = sum(a["loss"] * a["tokens"] for a in alone)
    assert batched["tokens"] == sum(a["tokens"] for a in alone)
    torch.testing.assert_close(torch.tensor(batched["loss"] * batched["tokens"]), torch.tensor(nll), rtol=1e-5, atol=1e-5)


def test_sft_from_a_tokenizer_without_role_tokens(tmp_path):
    """A base tokenizer from elsewhere (byte-level BPE, EOS "</s>", no role or padding tokens):
    the role tokens are added as single special tokens, the template ends turns with that EOS,
    the training ids equal the served encoding of the rendered template, and the model's
    embeddings grow to cover the new ids."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.finetune.finetune import setup_finetune
    from pipeline.finetune.sft import prepare_chat_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["How do I reset my password? Click on forgot password. Thanks! Hello there"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    n_before = len(tok)
    GPT2LMHeadModel(GPT2Config(vocab_size=n_before, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        str(tmp_path / "base"))
    assert prepare_chat_tokenizer(tok) == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert prepare_chat_tokenizer(tok) == []  # idempotent
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")]
    assert len(set(ids)) == 3 and min(ids) >= n_before
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I reset my password?"},
                {"role": "assistant", "content": "Click on forgot password."}]
    ex = tokenize_chat(messages, tok, 64)
    n = sum(ex["attention_mask"])
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered.count("</s>") == 3 and "<|endoftext|>" not in rendered
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ex["input_ids"][:n]  # what Serve encodes
    learned = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tok.decode(learned) == "Click on forgot password.</s>"
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ex["input_ids"][:len(tok(prompt, add_special_tokens=False)["input_ids"])]
    tok.save_pretrained(str(tmp_path / "tok"))
    model, _, _, _ = setup_finetune({"base_model": str(tmp_path / "base"), "tokenizer_dir": str(tmp_path / "tok"),
                                     "loop": {"seed": 0}, "task": "sft"})
    assert model.get_input_embeddings().num_embeddings == len(tok) == n_before + 3
    batch = {k: torch.tensor([ex[k]]) for k in ("input_ids", "attention_mask", "labels")}
    assert torch.isfinite(model(**batch).loss)
    # GPT2Config's EOS (50256) is no token of this vocabulary: the exported model's generate() must
    # stop at "</s>", which ends every turn of the template
    eos = tok.convert_tokens_to_ids("</s>")
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eos
    assert model.config.bos_token_id is None and model.generation_config.pad_token_id == eos
    model.save_pretrained(str(tmp_path / "out"))
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert again.generation_config.eos_token_id == eos
    with torch.no_grad():  # the model is made to say "</s>" first: generate() stops there
        again.lm_head.weight.zero_()
        again.transformer.ln_f.weight.zero_()
        again.transformer.ln_f.bias.zero_()
        again.transformer.ln_f.bias[0] = 1.0
        again.lm_head.weight[eos, 0] = 1.0
    out = again.generate(torch.tensor([ex["input_ids"][:5]]), max_new_tokens=8, do_sample=False)
    assert out[0, 5:].tolist() == [eos]


def test_sft_template_opens_with_bos_where_the_base_tokenizer_does():
    """A Llama-style tokenizer starts every text with BOS (its model saw BOS first throughout
    pretraining): our template then opens with it too, the training ids start with it (no label),
    and they equal what Serve encodes from the rendered template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.finetune.sft import CHAT_TEMPLATE_BOS, adds_bos, prepare_chat_tokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend.train_from_iterator(["How do I reset my password? Click on forgot password."] * 20,
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert adds_bos(tok)
    prepare_chat_tokenizer(tok)
    assert tok.chat_template == CHAT_TEMPLATE_BOS
    messages = [{"role": "user", "content": "How do I reset my password?"},
                {"role": "assistant", "content": "Click on forgot password."}]
    ex = tokenize_chat(messages, tok, 64)
    n = sum(ex["attention_mask"])
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == -100
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<s><|user|>") and tok(rendered, add_special_tokens=False)["input_ids"] == ex["input_ids"][:n]
    assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == "Click on forgot password.</s>"


def test_max_seq_len_beyond_the_base_context_is_refused_before_training(tmp_path, tok):
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, run_finetune
    from pipeline.model.build import ModelConfig, build_model

    build_model(ModelConfig(preset="tiny", max_seq_len=32), len(tok)).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    cfg = from_dict(FinetuneConfig, {"task": "classification", "base_model": str(tmp_path / "base"),
                                     "output_dir": str(tmp_path / "out"), "data": {"train": str(data), "max_seq_len": 64}})
    with pytest.raises(ValueError, match=r"data\.max_seq_len \(64\) exceeds the base model's context length \(32\)"):
        run_finetune(cfg)
    assert not (tmp_path / "out").exists()


def test_a_masked_base_at_a_gpt2_learning_rate_is_warned_about(tmp_path, tok, caplog):
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, check_finetune
    from pipeline.model.build import ModelConfig, build_model

    build_model(ModelConfig(preset="tiny", objective="masked", max_seq_len=64), len(tok), tok.pad_token_id) \
        .save_pretrained(str(tmp_path / "mlm"))
    tok.save_pretrained(str(tmp_path / "mlm"))
    cfg = {"task": "classification", "base_model": str(tmp_path / "mlm"), "data": {"train": "unused.jsonl", "max_seq_len": 32}}
    check_finetune(from_dict(FinetuneConfig, {**cfg, "optim": {"lr": 3e-4}}))
    assert "masked (BERT-style" not in caplog.text
    check_finetune(from_dict(FinetuneConfig, {**cfg, "optim": {"lr": 1e-3}}))
    assert "optim.lr 1.0e-03 on a masked (BERT-style, post-norm) base" in caplog.text


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_keeps_a_bases_own_chat_template_and_masks_by_turn(tmp_path):
    """A chat model from elsewhere keeps its template (data.chat_template: auto): labels cover
    exactly what each assistant turn adds to the rendering, and the prompt tokens are the ones
    Serve encodes for the same conversation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.finetune.sft import prepare_chat_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["How do I reset my password? Click on forgot password. Thanks! Hello there"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tok.chat_template = CHATML
    assert prepare_chat_tokenizer(tok) == [] and tok.chat_template == CHATML  # kept, nothing added
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I reset my password?"},
                {"role": "assistant", "content": "Click on forgot password."}, {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "Hello there"}]
    ex = tokenize_chat(messages, tok, 96)
    n = sum(ex["attention_mask"])
    assert tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"] == ex["input_ids"][:n]
    learned = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert [l for l in ex["labels"] if l != -100] == learned
    assert tok.decode(learned) == "Click on forgot password.<|im_end|>\nHello there<|im_end|>\n"
    for upto in (2, 4):
        prompt = tok(tok.apply_chat_template(messages[:upto], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        assert ex["input_ids"][:len(prompt)] == prompt and ex["labels"][len(prompt)] != -100
    # "builtin" replaces it with ours
    assert prepare_chat_tokenizer(tok, "builtin") == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert tok.chat_template == CHAT_TEMPLATE


def test_a_kept_chat_templates_end_of_turn_ends_generation(tmp_path):
    """A base model from elsewhere whose EOS is "<|endoftext|>" and whose chat template ends each
    turn with "<|im_end|>" (Qwen's base models): after SFT its config and generation config name
    both, and Serve's engine stops at either; min_tokens holds both back. Without that, a chat
    model trained to say "<|im_end|>" would talk on through the next turn's markup."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.finetune.finetune import setup_finetune
    from pipeline.finetune.sft import prepare_chat_tokenizer, turn_end_id
    from pipeline.serve.engine import Engine, SamplingParams

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["How do I reset my password? Click on forgot password. Thanks! Hello there"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                    "<|im_end|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    eot, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert prepare_chat_tokenizer(tok) == [] and turn_end_id(tok) == eot != eos
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=eos,
                               eos_token_id=eos)).save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "tok"))
    model, _, _, _ = setup_finetune({"base_model": str(tmp_path / "base"), "tokenizer_dir": str(tmp_path / "tok"),
                                     "loop": {"seed": 0}, "task": "sft"})
    assert model.config.eos_token_id == model.generation_config.eos_token_id == [eos, eot]
    engine = Engine(model, tok, fast_path=False)
    assert engine.stop_ids == {eos, eot}
    with torch.no_grad():  # the model says "<|im_end|>" first, whatever it reads
        model.lm_head.weight.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[eot, 0] = 1.0
    prompt = engine.encode(tok.apply_chat_template([{"role": "user", "content": "Thanks!"}], tokenize=False,
                                                   add_generation_prompt=True))
    g = engine.generate([(prompt, SamplingParams(max_tokens=5, temperature=0))])[0]
    assert g.finish_reason == "stop" and g.token_ids == []
    g = engine.generate([(prompt, SamplingParams(max_tokens=5, temperature=0, min_tokens=2))])[0]
    assert len(g.token_ids) >= 2 and eot not in g.token_ids[:2] and eos not in g.token_ids[:2]


def test_sft_rejects_conversations_a_template_does_not_render_turn_by_turn(tok):
    import copy

    odd = copy.deepcopy(tok)  # a template that drops earlier assistant turns (as reasoning templates do)
    odd.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|user|>\n"
                         "{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError, match="turn by turn.*chat_template: builtin"):
        tokenize_chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                       {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Hello there"}], odd, 64)


def test_the_carved_validation_split_leaves_every_label_in_train():
    """Without a val file, about data.val_fraction of the rows go to validation; a rare label whose
    rows all drew validation stays in train (it could not be learned otherwise), and no row is lost."""
    from pipeline.finetune.finetune import _in_val, split_off_val

    pairs = [(f"common text {i}", "ab"[i % 2]) for i in range(200)]
    rare = next(f"rare text {j}" for j in range(1000) if _in_val(f"200:{f'rare text {j}'}", 0.5))
    pairs.append((rare, "rare"))  # its one row draws validation
    train, val = split_off_val(pairs, 0.5)
    assert {y for _, y in train} == {"a", "b", "rare"} and (rare, "rare") in train
    assert 60 < len(val) < 140 and sorted(train + val) == sorted(pairs)


def test_the_carved_validation_split_is_stratified_by_label():
    """A file sorted by class (as exports often are): each label gives its share of rows to
    validation, the remainder going to the largest shares, so no class is missing there; the
    same rows each time, whatever the order of the file, and none lost."""
    from collections import Counter

    from pipeline.finetune.finetune import split_off_val

    pairs = [(f"an os text {i}", "os") for i in range(52)] + [(f"a text text {i}", "text") for i in range(43)]
    train, val = split_off_val(pairs, 0.1)
    assert Counter(y for _, y in val) == {"os": 5, "text": 5} and sorted(train + val) == sorted(pairs)
    assert split_off_val(pairs, 0.1) == (train, val)
    many = [(f"row {i}", str(i % 7)) for i in range(1000)] + [("solo", "x"), ("pair 1", "y"), ("pair 2", "y")]
    train, val = split_off_val(many, 0.05)
    counts = Counter(y for _, y in val)
    assert len(val) == 50 and set(counts) == set("0123456") and all(7 <= counts[y] <= 8 for y in "0123456")
    assert ("solo", "x") in train and sorted(train + val) == sorted(many)
    assert len(split_off_val([("a", "1"), ("b", "1"), ("c", "2")], 0.1)[1]) == 1  # a fraction > 0 asks for a row
    assert split_off_val([("a", "1"), ("b", "2")], 0.1) == ([("a", "1"), ("b", "2")], [])  # each label's only row trains


def test_rows_whose_label_has_no_training_row_are_counted_not_fatal(tmp_path, tok):
    """A val or test file with a class the train file lacks (a rare class that a hash split put
    outside train): those rows are rejected with the reason, the rest trains."""
    from pipeline.finetune.finetune import FinetuneConfig, FinetuneDataConfig, build_examples

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
        return str(tmp_path / name)

    train = write("train.jsonl", [("Goal in the last minute.", "sport"), ("New chip released.", "tech")] * 3)
    val = write("val.jsonl", [("Match report.", "sport"), ("Rain tomorrow.", "weather")])
    test = write("test.jsonl", [("GPU news.", "tech"), ("Sunny.", "weather"), ("Snow.", "weather")])
    cfg = FinetuneConfig(task="classification", base_model="unused",
                         data=FinetuneDataConfig(train=train, val=val, test=test, max_seq_len=16))
    rows, info, bad = build_examples(cfg, tok)
    assert sorted(info["label2id"]) == ["sport", "tech"] and [len(rows[s]) for s in ("train", "val", "test")] == [6, 1, 1]
    assert [b["where"] for b in bad] == [f"{val}:2 (val)", f"{test}:2 (test)", f"{test}:3 (test)"]  # their lines
    assert all("label 'weather' has no row in the train split" in b["reason"] for b in bad)
    only_weather = write("v2.jsonl", [("Rain tomorrow.", "weather")])
    with pytest.raises(ValueError, match="data.val: no row to validate on"):
        build_examples(FinetuneConfig(task="classification", base_model="unused",
                                      data=FinetuneDataConfig(train=train, val=only_weather, max_seq_len=16)), tok)


def test_article_rows_hold_every_window_of_a_text(tok):
    """``data.window_training: article``: one row per text, its windows stacked (padding windows
    masked out entirely), the same windows the window-by-window rows hold."""
    import copy

    import numpy as np

    from pipeline.finetune.article import encode_articles
    from pipeline.finetune.classify_data import Windowing, end_with_eos

    t = copy.deepcopy(tok)
    end_with_eos(t)
    long = " ".join(f"Hello there number {i}." for i in range(12))
    w = Windowing(16, windows=4, overlap=4)
    per_window = encode_classification([long, "Hello there"], ["a", "b"], {"a": 0, "b": 1}, t, w)
    rows = encode_articles([long, "Hello there"], ["a", "b"], {"a": 0, "b": 1}, t, w)
    assert [r["labels"] for r in rows] == [0, 1] and all(r["input_ids"].shape == (4, 16) for r in rows)
    assert [int(r["attention_mask"].any(-1).sum()) for r in rows] == [4, 1]
    stacked = [x for r in rows for x, m in zip(r["input_ids"], r["attention_mask"]) if m.any()]
    assert [list(x) for x in stacked] == [r["input_ids"] for r in per_window]
    assert (rows[1]["input_ids"][1:] == t.pad_token_id).all() and not rows[1]["attention_mask"][1:].any()
    assert np.array_equal(rows[0]["attention_mask"][0], per_window[0]["attention_mask"])


@pytest.mark.parametrize("pooling", ["logits", "probs", None])
def test_the_article_classifier_pools_its_windows_as_saved(tmp_path, pooling):
    """Its logits are each text's log-probabilities, its windows pooled by the classifier's saved
    window_pooling (softmax of the mean logit, or the mean probability; a model saved without
    the setting: the mean probability), its loss their NLL (labels of -100 skipped); gradients
    reach the classifier; a checkpoint of it is the plain classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    from pipeline.finetune.article import ArticleClassifier
    from pipeline.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    inner = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                                     num_labels=3, pad_token_id=0)).eval()
    torch.nn.init.normal_(inner.score.weight, std=1.0)  # logits far enough apart for the poolings to differ
    if pooling:
        inner.config.window_pooling = pooling
    ids = torch.randint(1, 50, (2, 3, 8))
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # text 0 has two windows, text 1 three
    mask[1, 1, 6:] = 0  # a window shorter than the others
    ids = ids.masked_fill(mask == 0, 0)
    model = ArticleClassifier(inner)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, -100]))
    with torch.no_grad():
        per_window = [torch.cat([inner(input_ids=ids[t, w:w + 1], attention_mask=mask[t, w:w + 1]).logits
                                 for w in range(n)]) for t, n in [(0, 2), (1, 3)]]
    mean_probs = torch.stack([x.softmax(-1).mean(0) for x in per_window])
    softmax_of_mean = torch.stack([x.mean(0).softmax(-1) for x in per_window])
    expected = softmax_of_mean if pooling == "logits" else mean_probs
    assert torch.allclose(out.logits.exp(), expected, atol=1e-5)
    assert not torch.allclose(mean_probs, softmax_of_mean, atol=1e-3)
    assert float(out.loss.detach()) == pytest.approx(-float(expected[0][2].log()), rel=1e-4)  # text 1's label is ignored
    out.loss.backward()
    assert inner.score.weight.grad is not None and inner.score.weight.grad.abs().sum() > 0
    save_checkpoint(tmp_path, model)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "GPT2ForSequenceClassification"
    assert torch.equal(loaded(input_ids=ids[1], attention_mask=mask[1]).logits,
                       inner(input_ids=ids[1], attention_mask=mask[1]).logits)


def test_the_auxiliary_next_token_loss_of_article_training(tmp_path, tok):
    """``aux_lm_weight``: in training, the loss is the texts' NLL plus the weight times the
    next-token cross-entropy of their windows through the tied input embeddings (padding and the
    windows of filler rows left out); in evaluation, the NLL alone; ``aux_lm_share`` scores a
    random share of the positions; a masked base and other tasks are refused, naming the key."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pipeline.config import from_dict
    from pipeline.finetune.article import ArticleClassifier
    from pipeline.finetune.finetune import FinetuneConfig, check_finetune, finetune_run_dir
    from pipeline.model.build import ModelConfig, build_model

    torch.manual_seed(0)
    inner = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                                     num_labels=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attn_pdrop=0.0))
    ids = torch.randint(1, 50, (2, 3, 8))
    mask = torch.ones_like(ids)
    mask[0, 2] = 0
    mask[1, 1, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.tensor([2, -100])  # text 1 is a filler row: no loss of either kind
    model = ArticleClassifier(inner, aux_lm_weight=0.5).train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    nll = model.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    with torch.no_grad():
        hidden = inner.transformer(input_ids=ids[0, :2], attention_mask=mask[0, :2]).last_hidden_state
        lm_logits = hidden[:, :-1] @ inner.transformer.wte.weight.T
    next_token = torch.nn.functional.cross_entropy(lm_logits.flatten(0, 1), ids[0, :2, 1:].flatten())
    assert float(loss) == pytest.approx(float(nll) + 0.5 * float(next_token), rel=1e-5)
    assert float(loss) > float(nll)
    # one position of a share: the cross-entropy of one of the window's real next tokens
    model.aux_lm_share = 1e-6
    with torch.no_grad():
        hidden = inner.transformer(input_ids=ids[1, 1:2], attention_mask=mask[1, 1:2]).last_hidden_state
        one = float(model.next_token_loss(hidden, ids[1, 1:2], mask[1, 1:2]))
        each = torch.nn.functional.cross_entropy((hidden[0, :4] @ inner.transformer.wte.weight.T), ids[1, 1, 1:5],
                                                 reduction="none")
    assert any(one == pytest.approx(float(x), rel=1e-5) for x in each)
    model.train().aux_lm_share = 1.0
    inner.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert inner.transformer.wte.weight.grad.abs().sum() > 0

    base = {"task": "classification", "base_model": "m", "data": {"train": "x.jsonl", "max_seq_len": 32}}
    article = {**base["data"], "windows": 4, "window_training": "article"}
    for extra, message in [({"aux_lm_weight": -1}, "aux_lm_weight must be >= 0"),
                           ({"aux_lm_weight": 0.5, "aux_lm_share": 0}, "aux_lm_share must be in"),
                           ({"aux_lm_weight": 0.5, "data": base["data"]},
                            "aux_lm_weight applies to task classification with data.window_training article only")]:
        with pytest.raises(ValueError, match=message):
            from_dict(FinetuneConfig, {**base, "data": article, **extra})
    # a run with the loss on is another run (its own directory); off, a run keeps the directory it had
    # before the keys existed
    dirs = {w: finetune_run_dir(from_dict(FinetuneConfig, {**base, "data": article, "aux_lm_weight": w}))
            for w in (0.0, 0.5)}
    assert dirs[0.0] != dirs[0.5]
    build_model(ModelConfig(preset="tiny", objective="masked", max_seq_len=64), len(tok), tok.pad_token_id) \
        .save_pretrained(str(tmp_path / "mlm"))
    with pytest.raises(ValueError, match="aux_lm_weight: a masked"):
        check_finetune(from_dict(FinetuneConfig, {**base, "base_model": str(tmp_path / "mlm"), "data": article,
                                                  "aux_lm_weight": 0.5, "optim": {"lr": 3e-4}}))


def test_article_training_can_read_a_random_subset_of_windows(tmp_path):
    """``data.train_windows``: each training step reads a random ``k`` of a text's windows (all of
    them where it has ``k`` or fewer), a different subset from draw to draw; evaluation reads every
    window; the workers' model gets the setting; bad values are refused, naming the key; at 0 a
    run keeps its directory."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pipeline.config import from_dict
    from pipeline.finetune.article import ArticleClassifier, sample_windows
    from pipeline.finetune.finetune import FinetuneConfig, finetune_run_dir

    torch.manual_seed(0)
    present = torch.tensor([[True, True, True, True, False], [True, False, False, False, False],
                            [True, True, False, False, False]])
    counts = torch.zeros(present.shape)
    for _ in range(400):
        kept = sample_windows(present, 2)
        assert not (kept & ~present).any() and kept.sum(-1).tolist() == [2, 1, 2]
        counts += kept
    assert counts[1, 0] == 400 and (counts[2, :2] == 400).all()
    assert ((counts[0, :4] / 400 - 0.5).abs() < 0.1).all()  # each of four windows kept about half the time

    inner = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                                     num_labels=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                     attn_pdrop=0.0))
    torch.nn.init.normal_(inner.score.weight, std=1.0)
    ids = torch.randint(1, 50, (2, 3, 8))
    mask = torch.ones_like(ids)
    mask[1, 2] = 0  # text 0 has three windows, text 1 two
    ids = ids.masked_fill(mask == 0, 0)
    rows_read = []
    inner.register_forward_hook(lambda m, args, kwargs, out: rows_read.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    model = ArticleClassifier(inner, train_windows=1).train()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    with torch.no_grad():
        per_window = inner(input_ids=ids[0], attention_mask=mask[0]).logits.log_softmax(-1)
    assert rows_read[0] == 2 and any(torch.allclose(out.logits[0], w, atol=1e-5) for w in per_window)
    model.eval()(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert rows_read[-1] == 5  # evaluation reads every window

    base = {"task": "classification", "base_model": "m", "data": {"train": "x.jsonl", "max_seq_len": 32}}
    article = {**base["data"], "windows": 4, "window_training": "article"}
    for data, message in [({**article, "train_windows": 5}, r"data.train_windows must be in \[0, data.windows = 4\]"),
                          ({**article, "train_windows": -1}, "data.train_windows must be in"),
                          ({**base["data"], "windows": 4, "train_windows": 2},
                           "data.train_windows applies to data.window_training article only")]:
        with pytest.raises(ValueError, match=message):
            from_dict(FinetuneConfig, {**base, "data": data})
    from pipeline.finetune.classify_data import ensure_pad_token
    from pipeline.finetune.finetune import setup_finetune

    tok = _no_pad_model(tmp_path)
    ensure_pad_token(tok)
    tok.save_pretrained(str(tmp_path / "tok"))
    worker_model, _, _, _ = setup_finetune({
        "base_model": str(tmp_path / "base"), "tokenizer_dir": str(tmp_path / "tok"), "loop": {"seed": 0},
        "task": "classification", "label2id": {"money": 0, "sport": 1}, "windowing": [12, 4, 2],
        "window_training": "article", "train_windows": 2})
    assert isinstance(worker_model, ArticleClassifier) and worker_model.train_windows == 2
    dirs = {k: finetune_run_dir(from_dict(FinetuneConfig, {**base, "data": {**article, "train_windows": k}}))
            for k in (0, 2)}
    assert dirs[0] == finetune_run_dir(from_dict(FinetuneConfig, {**base, "data": article})) and dirs[0] != dirs[2]


def test_the_job_summary_names_the_rejected_records_file():
    """The finetune job's last lines: the summary as JSON, then, when records were rejected, where
    each one's reason is."""
    import jobs.finetune

    line = jobs.finetune.render({"task": "sft", "model_dir": "/o/run/model", "rejected": 2})
    assert json.loads(line.splitlines()[0])["rejected"] == 2
    assert line.splitlines()[1] == "2 record(s) rejected, each with its reason: /o/run/rejected.json"
    assert len(jobs.finetune.render({"task": "sft", "model_dir": "/o/run/model", "rejected": 0}).splitlines()) == 1


@pytest.mark.parametrize("key", ["train", "val"])
def test_an_output_dir_inside_a_data_directory_is_refused(tmp_path, key):
    """A data directory is read recursively: a run writing inside it would have the next one read
    its summary, metrics and rejected records as data. Refused before any work, naming both keys."""
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, check_finetune

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text('{"prompt": "hi", "completion": "hello"}\n')
    data = {"train": str(tmp_path / "chat.jsonl"), key: str(tmp_path / "data")}
    cfg = {"task": "sft", "base_model": str(tmp_path / "none"), "data": data}
    with pytest.raises(ValueError, match=rf"output_dir \(.*runs\) is inside data.{key} \(.*data\), a directory read"):
        check_finetune(from_dict(FinetuneConfig, {**cfg, "output_dir": str(tmp_path / "data" / "runs")}))
    with pytest.raises(ValueError, match="base_model"):  # elsewhere, the check passes (and the next one speaks)
        check_finetune(from_dict(FinetuneConfig, {**cfg, "output_dir": str(tmp_path / "runs")}))


def test_a_bos_only_template_gets_eos_and_keeps_it_after_reload(tmp_path):
    """A Llama-style tokenizer (its template prepends BOS only) ends classifier texts with EOS too,
    BOS kept, through its saved add_bos_token / add_eos_token flags; BERT's template is left as is."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from pipeline.finetune.classify_data import Windowing, encode_windows, end_with_eos

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello world, the market fell and shares rose"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tok = transformers.LlamaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    plain = tok("hello world", add_special_tokens=False)["input_ids"]
    assert tok("hello world")["input_ids"] == [1] + plain
    assert end_with_eos(tok)
    assert tok("hello world")["input_ids"] == [1] + plain + [2]
    enc, _ = encode_windows(tok, ["the market fell " * 10], Windowing(8, windows=3, overlap=2), padding=False)
    assert all(ids[0] == 1 and ids[-1] == 2 and len(ids) <= 8 for ids in enc["input_ids"]) and len(enc["input_ids"]) > 1
    tok.save_pretrained(str(tmp_path / "t"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert again("hello world")["input_ids"] == [1] + plain + [2] and end_with_eos(again)
    bert = transformers.BertTokenizerFast(vocab_file=_bert_vocab(tmp_path))
    before = bert("hello world")["input_ids"]
    assert not end_with_eos(bert) and bert("hello world")["input_ids"] == before


def _bert_vocab(tmp_path) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    return str(path)


def test_a_training_directory_holding_held_out_files_is_refused(tmp_path):
    """A dataset directory as the Hub lays it out (``data/train-*.parquet``, ``data/test-*.parquet``)
    given as ``data.train``: every file would be trained on, its test split too. Refused before any
    work, naming the files; its train files alone (a glob) pass."""
    from pipeline.config import from_dict
    from pipeline.finetune.finetune import FinetuneConfig, check_finetune, held_out_files

    (tmp_path / "repo" / "data").mkdir(parents=True)
    for name in ("train-00000-of-00001.jsonl", "test-00000-of-00001.jsonl"):
        (tmp_path / "repo" / "data" / name).write_text('{"text": "a", "label": "b"}\n')
    (tmp_path / "repo" / "testimonials.jsonl").write_text('{"text": "a", "label": "b"}\n')
    assert held_out_files(str(tmp_path / "repo")) == ["data/test-00000-of-00001.jsonl"]
    assert held_out_files(str(tmp_path / "repo" / "data" / "train-*.jsonl")) == []
    assert held_out_files(str(tmp_path / "repo" / "data" / "test-00000-of-00001.jsonl")) == []  # one file: as given
    cfg = {"task": "classification", "base_model": str(tmp_path / "none"), "output_dir": str(tmp_path / "out")}
    with pytest.raises(ValueError, match=r"data.train: .*repo holds files named for held-out splits "
                                         r"\(data/test-00000-of-00001.jsonl\)"):
        check_finetune(from_dict(FinetuneConfig, {**cfg, "data": {"train": str(tmp_path / "repo")}}))
    with pytest.raises(ValueError, match="base_model"):  # the train files alone pass this check
        check_finetune(from_dict(FinetuneConfig, {**cfg, "data": {"train": str(tmp_path / "repo/data/train-*.jsonl")}}))
    # a load_dataset cache directory: its splits have no paths to keep them apart; refused by name
    import datasets

    datasets.load_dataset("json", data_files={"train": str(tmp_path / "repo" / "testimonials.jsonl")},
                          cache_dir=str(tmp_path / "cache"))
    cache = next((tmp_path / "cache").rglob("dataset_info.json")).parent
    with pytest.raises(ValueError, match=r"data.val: .* is a datasets cache directory"):
        check_finetune(from_dict(FinetuneConfig, {**cfg, "data": {"train": str(tmp_path / "repo/data/train-*.jsonl"),
                                                                  "val": str(cache)}}))
