"""Source formats and bad input: every record is either a document or a quarantine record with a
reason; nothing raises, nothing disappears."""

import codecs
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import schema as S
from pipeline.config import from_dict
from pipeline.data.sources import SourceConfig, expand_source, json_records, read_file, text_lines

MAX = 1_000_000


def read_all(src: SourceConfig) -> list[dict]:
    return [r for t in expand_source(src) for r in read_file(t, MAX)]


def reasons(records):
    return sorted(r[S.REASON] for r in records if r.get(S.STATUS) == S.STATUS_QUARANTINED)


def test_text_dir_with_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("A good document.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Another one.")
    (tmp_path / "sub" / "c.rst").write_text("Docs in reStructuredText.\n==========\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    (tmp_path / "empty.txt").write_text("  \n ")
    (tmp_path / "big.txt").write_bytes(b"word " * 2_100_000)  # 10.5 MB
    (tmp_path / "notes.xyz").write_text("unknown extension")
    recs = read_all(SourceConfig(path=str(tmp_path), name="d"))
    docs = {r[S.DOC_ID]: r for r in recs if r.get(S.STATUS) is None}
    assert set(docs) == {"d:a.txt", "d:sub/b.md", "d:sub/c.rst"}
    assert docs["d:a.txt"][S.TEXT] == "A good document." and docs["d:a.txt"][S.SOURCE] == "d"
    assert reasons(recs) == ["empty_text", "invalid_utf8", "too_large", "unsupported_format"]
    bad = next(r for r in recs if r.get(S.REASON) == "invalid_utf8")
    assert "byte 3" in bad[S.DETAIL] and bad[S.RAW_EXCERPT].startswith("caf")


def test_a_load_dataset_cache_directory(tmp_path):
    """``load_dataset``'s cache (``dataset_info.json`` beside ``NAME-SPLIT.arrow`` files, no
    ``state.json``) is read by a prepare source, each split's records keeping it (``ClassLabel``
    names too); fine-tuning, which takes splits by path, refuses it naming the way to save it."""
    import datasets

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Document {i}.", "label": i % 2}) + "\n" for i in range(4)))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.load_dataset("json", data_files={"train": str(rows), "test": str(rows)}, features=features,
                          cache_dir=str(tmp_path / "cache"))
    cache = next((tmp_path / "cache").rglob("dataset_info.json")).parent
    recs = read_all(SourceConfig(path=str(cache), label_field="label"))
    assert sorted((r[S.SPLIT], r[S.TEXT], r[S.LABEL]) for r in recs)[:2] == [("test", "Document 0.", "neg"),
                                                                             ("test", "Document 1.", "pos")]
    assert [r[S.SPLIT] for r in recs].count("train") == 4 and not reasons(recs)
    from pipeline.data.sources import check_not_cache

    with pytest.raises(ValueError, match=r"data.train: .* is a datasets cache directory .*save_to_disk\(DIR\)"):
        check_not_cache(str(cache), "data.train")
    check_not_cache(str(rows), "data.train")
    for arrow in cache.glob("*.arrow"):  # a dataset_info.json alone: the reason says what is missing
        arrow.unlink()
    assert "neither a dataset written by save_to_disk" in read_all(SourceConfig(path=str(cache)))[0][S.DETAIL]


def test_file_and_directory_names_give_splits_as_the_hub_lays_them_out(tmp_path):
    """A directory as the Hugging Face Hub lays a dataset out (``data/train-00000-of-00001.parquet``,
    ``test.jsonl``, ``validation/part.jsonl``) keeps those splits under ``splits: source``; a name
    that only starts with the letters (``testimonials``) names none; ``splits: hash``, a
    ``split_field`` or a single file given alone leave every record to the hash."""
    from pipeline.data.sources import file_split

    assert [file_split(r) for r in ("data/train-00000-of-00001.parquet", "test.jsonl", "validation/part-0.jsonl",
                                     "dev_matched.csv", "testimonials.txt", "train/notes/testing.txt", "x/y.txt")] == [
        "train", "test", "val", "val", None, "test", None]
    (tmp_path / "validation").mkdir()
    for rel, text in (("train.jsonl", "Train record."), ("test.jsonl", "Test record."),
                      ("validation/part-0.jsonl", "Val record."), ("testimonials.jsonl", "Unnamed record.")):
        (tmp_path / rel).write_text(json.dumps({"text": text, "part": "test"}) + "\n")
    (tmp_path / "test-notes.txt").write_text("A text file named for the test split.")

    def splits(**kw):
        return {r[S.TEXT]: r[S.SPLIT] for r in read_all(SourceConfig(path=str(tmp_path), **kw)) if not r.get(S.STATUS)}

    assert splits() == {"Train record.": "train", "Test record.": "test", "Val record.": "val",
                        "Unnamed record.": None, "A text file named for the test split.": "test"}
    assert set(splits(splits="hash").values()) == {None}
    assert set(splits(split_field="part", format="jsonl").values()) == {"test"}  # the field decides, not the names
    assert read_all(SourceConfig(path=str(tmp_path / "test.jsonl")))[0][S.SPLIT] is None


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_text_files_sampled_by_line_or_paragraph(tmp_path, suffix):
    """``sample_by: line`` makes each non-blank line of a text file a document (a corpus written one
    document per line), ``paragraph`` each run of lines between blank ones; an undecodable line is
    quarantined with its unit only, an oversized unit alone. The default, a file per document,
    names the setting when a file is too large."""
    raw = (b"First document, one line.\r\nSecond document\n\n\nThird, a paragraph\nof two lines.\n"
           b"caf\xe9 is Latin-1\n\n" + b"long " * 30 + b"\n")
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    recs = read_all(SourceConfig(path=str(path), sample_by="line"))
    assert [(r[S.DOC_ID].rsplit(":", 1)[1], r.get(S.TEXT)) for r in recs] == [
        ("1", "First document, one line."), ("2", "Second document"), ("5", "Third, a paragraph"),
        ("6", "of two lines."), ("7", None), ("9", ("long " * 30).rstrip() + " ")]
    assert reasons(recs) == ["invalid_utf8"]
    recs = read_all(SourceConfig(path=str(path), sample_by="paragraph"))
    assert [(r[S.DOC_ID].rsplit(":", 1)[1], r.get(S.TEXT)) for r in recs] == [
        ("1", "First document, one line.\nSecond document"), ("5", None), ("9", "long " * 30)]
    assert reasons(recs) == ["invalid_utf8"]
    assert [r.get(S.REASON) for r in (r for t in expand_source(SourceConfig(path=str(path), sample_by="line"))
                                      for r in read_file(t, 100))] == [None] * 4 + ["invalid_utf8", "too_large"]
    assert [r.get(S.REASON) for r in (r for t in expand_source(SourceConfig(path=str(path), sample_by="paragraph"))
                                      for r in read_file(t, 50))] == [None, "invalid_utf8", "too_large"]
    (tmp_path / "big.txt").write_text("a line of words\n" * 1000)  # one paragraph, held only up to the limit
    big = [r for t in expand_source(SourceConfig(path=str(tmp_path / "big.txt"), sample_by="paragraph"))
           for r in read_file(t, 100)]
    assert reasons(big) == ["too_large"] and big[0][S.DETAIL].startswith("15999 bytes > ")
    whole = [r for t in expand_source(SourceConfig(path=str(path))) for r in read_file(t, 100)]
    assert reasons(whole) == ["too_large"] and "set the source's sample_by" in whole[0][S.DETAIL]
    # a key that would be ignored is an error naming it
    from pipeline.data.sources import check_record_keys

    with pytest.raises(ValueError, match="sample_by line splits text files into documents, but it holds jsonl"):
        check_record_keys(SourceConfig(path="x.jsonl", sample_by="line"), "sources[0]", {"jsonl"})
    with pytest.raises(ValueError, match="sample_by"):
        from_dict(SourceConfig, {"path": "x", "sample_by": "sentence"})


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_with_malformed_lines(tmp_path, suffix):
    lines = [
        json.dumps({"text": "First good document.", "label": "a", "id": "x1"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": None}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"text": "   "}),
        json.dumps({"text": "Second good document.", "label": 3}),
        json.dumps({"text": "A document with a list label.", "label": ["a", "b"]}),
        json.dumps({"text": "A NaN label is no label.", "label": float("nan")}),
    ]
    raw = b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'
    path = tmp_path / f"data{suffix}"
    if suffix.endswith(".gz"):
        raw = gzip.compress(raw)
    elif suffix.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    recs = read_all(SourceConfig(path=str(path), label_field="label", id_field="id"))
    docs = [r for r in recs if r.get(S.STATUS) is None]
    assert [d[S.TEXT] for d in docs] == ["First good document.", "Second good document.", "A NaN label is no label."]
    assert [d[S.LABEL] for d in docs] == ["a", "3", None]
    assert docs[0][S.DOC_ID] == "data:x1" and docs[1][S.DOC_ID] == "data:data" + suffix + ":9"
    assert reasons(recs) == sorted(["malformed_json", "missing_text_field", "non_string_text", "missing_text_field",
                                    "malformed_json", "empty_text", "bad_label", "invalid_utf8"])
    assert len(recs) == 11  # 12 lines, one blank


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_json_arrays_and_json_lines_under_a_json_name(tmp_path, suffix):
    """A ``.json`` file holding one array of objects (Alpaca-style datasets) gives one record per
    element, each non-object or bad element quarantined with its index; JSON Lines under a .json
    name read as JSONL; an array that does not parse is one quarantine record."""
    items = [{"text": "First good document.", "label": "a"}, ["not", "an object"], {"text": ""},
             {"body": "no text"}, {"text": "Second good document.", "label": "b"}]
    raw = json.dumps(items, indent=1).encode()
    path = tmp_path / f"arr{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    recs = read_all(SourceConfig(path=str(path), label_field="label"))
    docs = [r for r in recs if r.get(S.STATUS) is None]
    assert [(d[S.TEXT], d[S.LABEL], d[S.DOC_ID]) for d in docs] == [
        ("First good document.", "a", f"arr:arr{suffix}:0"), ("Second good document.", "b", f"arr:arr{suffix}:4")]
    assert reasons(recs) == ["empty_text", "malformed_json", "missing_text_field"] and len(recs) == 5
    (tmp_path / "lines.json").write_text(json.dumps({"text": "One."}) + "\n" + json.dumps({"text": "Two."}) + "\n")
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=str(tmp_path / "lines.json")))] == ["One.", "Two."]
    (tmp_path / "broken.json").write_text('[{"text": "cut off"')
    assert reasons(read_all(SourceConfig(path=str(tmp_path / "broken.json")))) == ["malformed_json"]
    # streamed element by element: the elements before a break are read, the rest is one record
    (tmp_path / "half.json").write_text('[{"text": "Kept before the break."}, {"text": oops}, {"text": "lost"}]')
    recs = read_all(SourceConfig(path=str(tmp_path / "half.json")))
    assert [r.get(S.TEXT) for r in recs] == ["Kept before the break.", None] and reasons(recs) == ["malformed_json"]
    assert recs[1][S.DOC_ID].endswith(":1") and "not read" in recs[1][S.DETAIL]
    # a byte the encoding cannot decode rejects its element only (in a value or a label)
    (tmp_path / "latin.json").write_bytes(b'[{"text": "caf\xc3\xa9 ok"}, {"text": "caf\xe9"}, {"text": "x", "y": "\xe9"},'
                                          b' {"text": "after"}]')
    recs = read_all(SourceConfig(path=str(tmp_path / "latin.json"), label_field="y"))
    assert [r.get(S.TEXT) for r in recs] == ["caf\u00e9 ok", None, None, "after"]
    assert reasons(recs) == ["invalid_utf8", "invalid_utf8"]
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=str(tmp_path / "latin.json"), encoding="latin-1"))][1] == "caf\u00e9"


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_a_json_file_holding_one_object(tmp_path, suffix):
    """A ``.json`` file holding one object, pretty-printed or on one line, is one record when it
    holds the text field, else its one list of records is read (``{"version": 1, "data": [...]}``,
    as ``datasets`` reads with ``field="data"``); an ambiguous or broken one is one quarantine
    record with the reason, not one per line."""
    def write(name, value, indent=2):
        raw = json.dumps(value, indent=indent).encode()
        (tmp_path / f"{name}{suffix}").write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
        return read_all(SourceConfig(path=str(tmp_path / f"{name}{suffix}"), label_field="label"))

    recs = write("single", {"text": "One document,\nwritten pretty.", "label": "a", "meta": {"n": [1, 2]}})
    assert [(r[S.DOC_ID], r[S.TEXT], r[S.LABEL]) for r in recs] == [
        (f"single:single{suffix}", "One document,\nwritten pretty.", "a")]
    rows = [{"text": "First record.", "label": "a"}, {"text": ""}, {"text": "Third record.", "label": "b"}]
    for indent in (2, None):  # pretty-printed, or the whole object on one line
        recs = write("wrapped", {"version": 1, "tags": ["x"], "data": rows}, indent)
        assert [(r[S.DOC_ID], r.get(S.TEXT)) for r in recs] == [
            (f"wrapped:wrapped{suffix}:data[0]", "First record."), (f"wrapped:wrapped{suffix}:data[1]", None),
            (f"wrapped:wrapped{suffix}:data[2]", "Third record.")]
        assert reasons(recs) == ["empty_text"]
    recs = write("two", {"train": rows, "test": rows})
    assert reasons(recs) == ["missing_text_field"] and "lists of objects under ['train', 'test']" in recs[0][S.DETAIL]
    recs = write("none", {"title": "no text", "n": 3})
    assert reasons(recs) == ["missing_text_field"] and "without a list of records" in recs[0][S.DETAIL]
    (tmp_path / "broken.json").write_text('{\n  "text": "cut off",\n  "label": \n')
    recs = read_all(SourceConfig(path=str(tmp_path / "broken.json")))
    assert reasons(recs) == ["malformed_json"] and len(recs) == 1 and "not valid JSON" in recs[0][S.DETAIL]
    # fine-tuning's readers take the same files: labeled rows, and chat records (one pretty-printed
    # chat is a record, its messages list no wrapper)
    from pipeline.finetune.classify_data import read_labeled_rows
    from pipeline.finetune.sft import load_chat_examples

    bad: list = []
    labeled = read_labeled_rows(str(tmp_path / f"wrapped{suffix}"), "text", "label", bad)
    assert [(r["text"], r["label"]) for r in labeled] == [("First record.", "a"), ("Third record.", "b")] and len(bad) == 1
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "chat.json").write_text(json.dumps(chat, indent=2))
    (tmp_path / "chats.json").write_text(json.dumps({"data": [chat, chat]}, indent=2))
    bad = []
    assert len(list(load_chat_examples(str(tmp_path / "chat.json"), bad))) == 1 and not bad
    assert len(list(load_chat_examples(str(tmp_path / "chats.json"), bad))) == 2 and not bad
    (tmp_path / "odd.json").write_text(json.dumps({"a": [chat], "b": [chat]}, indent=2))
    assert not list(load_chat_examples(str(tmp_path / "odd.json"), bad))
    assert "lists of objects under ['a', 'b']" in bad[0]["reason"] and bad[0]["where"].endswith("odd.json")


def test_json_array_stream_matches_json_loads_at_any_chunking():
    """Elements cut anywhere between chunks (inside strings, numbers, escapes) parse as a whole."""
    import random

    from pipeline.data.sources import JsonArrayError, iter_json_array

    rng = random.Random(0)

    def chunks(text, size):
        return iter([text[i:i + size] for i in range(0, len(text), size)])

    values = [{"t": 'x"y\u00e9 ,]', "n": [1, {"b": None}]}, 12345, -1.5e10, 0.25, "s", True, None, {}, []]
    for trial in range(300):
        items = [rng.choice(values) for _ in range(rng.randint(0, 6))]
        text = ("\ufeff \n" if trial % 3 == 0 else "") + json.dumps(items, indent=trial % 2 or None) + " \n"
        assert list(iter_json_array(chunks(text, rng.choice([1, 2, 3, 7, 64])))) == items
    for broken, read, index in (("[1,2", [1, 2], 2), ("[1 2]", [1], 1), ("[1,]", [1], 1), ('{"a": 1}', [], 0),
                                ("[1] x", [1], 1), ("[1.5e", [], 0)):
        got: list = []
        with pytest.raises(JsonArrayError) as err:
            got.extend(iter_json_array(chunks(broken, 2)))
        assert got == read and err.value.index == index


def test_parquet_csv_hf_and_file_uri(tmp_path):
    pq.write_table(pa.table({"content": ["Parquet doc one.", None, "Parquet doc two."], "y": [1, 2, 3]}),
                   tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text('\ufeffcontent,y\n"CSV doc, with comma.",a\n"multi\nline",b\n,c\n')  # with a BOM
    import datasets

    datasets.Dataset.from_dict({"content": ["HF doc."], "y": ["z"]}).save_to_disk(str(tmp_path / "hf"))

    recs = read_all(SourceConfig(path=f"file://{tmp_path}/t.parquet", text_field="content", label_field="y"))
    assert [r.get(S.TEXT) for r in recs] == ["Parquet doc one.", None, "Parquet doc two."]
    assert reasons(recs) == ["missing_text_field"] and recs[2][S.LABEL] == "3"
    assert recs[0][S.PATH].startswith("file://")

    recs = read_all(SourceConfig(path=str(tmp_path / "t.csv"), text_field="content", label_field="y"))
    assert [r.get(S.TEXT) for r in recs] == ["CSV doc, with comma.", "multi\nline", None]
    assert reasons(recs) == ["empty_text"]
    # a spreadsheet's semicolon-separated export (its header holds no comma), or one by vertical bars;
    # a comma in the header keeps commas, whatever the rows hold
    (tmp_path / "semi.csv").write_text('content; y\n"Doc; one, with both.";a\nDoc two;b\n')
    (tmp_path / "bar.csv").write_text('content|y\nDoc one, a; b|a\n')
    (tmp_path / "comma.csv").write_text('content,y\nDoc; one|a,b\n')
    for name, want in (("semi", [("Doc; one, with both.", "a"), ("Doc two", "b")]), ("bar", [("Doc one, a; b", "a")]),
                       ("comma", [("Doc; one|a", "b")])):
        recs = read_all(SourceConfig(path=str(tmp_path / f"{name}.csv"), text_field="content", label_field="y"))
        assert [(r[S.TEXT], r[S.LABEL]) for r in recs] == want, name
    # finetune's labeled-file reader takes the same files
    from pipeline.finetune.classify_data import read_labeled_rows

    bad: list = []
    rows = read_labeled_rows(str(tmp_path / "semi.csv"), "content", "y", bad)
    assert [(r["text"], r["label"]) for r in rows] == [("Doc; one, with both.", "a"), ("Doc two", "b")] and not bad

    recs = read_all(SourceConfig(path=str(tmp_path / "hf"), text_field="content", label_field="y"))
    assert [(r[S.TEXT], r[S.LABEL]) for r in recs] == [("HF doc.", "z")]


def test_hf_dataset_dict_with_an_empty_split(tmp_path):
    """A DatasetDict saved with an empty split (load_from_disk of the whole dict raises IndexError):
    every row of the other splits is read, split names in the ids; SFT data reads it too."""
    import datasets

    rows = datasets.Dataset.from_dict({"content": ["First doc.", "Second doc."]})
    datasets.DatasetDict({"train": rows, "test": rows.select([])}).save_to_disk(str(tmp_path / "dd"))
    recs = read_all(SourceConfig(path=f"file://{tmp_path}/dd", text_field="content"))
    assert [(r[S.DOC_ID].split(":")[-1], r[S.TEXT]) for r in recs] == [("train/0", "First doc."), ("train/1", "Second doc.")]
    # a ClassLabel column gives its class names
    named = datasets.Dataset.from_dict({"content": ["A doc."], "y": [1]}, features=datasets.Features(
        {"content": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])}))
    named.save_to_disk(str(tmp_path / "named"))
    assert [r[S.LABEL] for r in read_all(SourceConfig(path=str(tmp_path / "named"), text_field="content",
                                                      label_field="y"))] == ["pos"]

    from pipeline.finetune.sft import load_chat_examples

    chats = datasets.Dataset.from_dict({"prompt": ["Hi?"], "completion": ["Hello."]})
    datasets.DatasetDict({"train": chats, "validation": chats.select([])}).save_to_disk(str(tmp_path / "chat"))
    bad: list = []
    assert list(load_chat_examples(str(tmp_path / "chat"), bad)) == [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]] and not bad
    # split names by role (UltraChat-style train_sft / test_sft): training reads no held-out split
    from pipeline.data.sources import hf_dict_splits, split_role

    held = datasets.Dataset.from_dict({"prompt": ["Held out?"], "completion": ["Yes."]})
    datasets.DatasetDict({"train_sft": chats, "test_sft": held}).save_to_disk(str(tmp_path / "ultra"))
    assert [c[0]["content"] for c in load_chat_examples(str(tmp_path / "ultra"), bad)] == ["Hi?"]
    assert sorted(hf_dict_splits(str(tmp_path / "ultra"))) == ["test", "train"]
    assert [split_role(n) for n in ("TRAIN", "training", "validation_matched", "dev", "test_gen", "unsupervised")] == \
        ["train", "train", "val", "val", "test", None]


def test_a_sources_own_splits_are_kept(tmp_path):
    """A saved DatasetDict's train / validation / test rows stay in those splits (other split names,
    and every row with splits: hash, are assigned by hash in finalize); a split_field does the same
    for any table format."""
    import datasets

    from pipeline.data import ray_ops
    from pipeline.data.split import SplitConfig

    rows = datasets.Dataset.from_dict({"content": ["A doc."]})
    datasets.DatasetDict({"train": rows, "validation": rows, "test": rows, "unsupervised": rows}).save_to_disk(
        str(tmp_path / "dd"))
    recs = read_all(SourceConfig(path=str(tmp_path / "dd"), text_field="content"))
    assert [r[S.SPLIT] for r in recs] == ["train", "val", "test", None]
    assert [r[S.SPLIT] for r in read_all(SourceConfig(path=str(tmp_path / "dd"), text_field="content",
                                                      splits="hash"))] == [None] * 4
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"t": f"Doc {i}.", "part": p})
                                                for i, p in enumerate(["TEST", "dev", "train", "other"])) + "\n")
    recs = read_all(SourceConfig(path=str(tmp_path / "s.jsonl"), text_field="t", split_field="part"))
    assert [r[S.SPLIT] for r in recs] == ["test", "val", "train", None]
    # finalize keeps a named held-out split; the source's other records are hashed into train and
    # only the held-out splits the source does not name itself
    kept = S.docs_table([dict(r, **{S.STATUS: S.STATUS_KEPT}) for r in recs])
    assert recs[0][S.SOURCE] == "s"

    def final(named, **fractions):
        return ray_ops._finalize(kept, "", "", 13, SplitConfig(**fractions), named).column(S.SPLIT).to_pylist()

    assert final({"s": ["test", "val"]}, val_fraction=0.85) == ["test", "val", "train", "train"]
    assert final({"s": ["test"]}, val_fraction=0.89) == ["test", "val", "val", "val"]  # no val of its own: carved
    assert final({"s": ["val"]}, val_fraction=0.0, test_fraction=0.99) == ["test", "val", "train", "train"]  # unlabeled: no test
    with pytest.raises(ValueError, match="splits"):
        from_dict(SourceConfig, {"path": "x", "splits": "random"})


def test_nested_fields_by_dotted_name(tmp_path):
    """text_field / label_field / id_field may name a field inside an object (JSONL) or a struct
    column (Parquet); a key that itself holds a dot still wins; a record without it is quarantined."""
    rows = [{"meta": {"id": "a1", "topic": "tech"}, "content": {"body": "Nested body one."}},
            {"meta": {"id": "a2", "topic": "sport"}, "content": {"body": "Nested body two."}},
            {"meta": {"id": "a3"}, "content": {"title": "no body here"}},
            {"meta": {"id": "a4"}, "content": "not an object", "content.body": "The flat key wins."}]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = SourceConfig(path=str(tmp_path / "n.jsonl"), text_field="content.body", label_field="meta.topic",
                       id_field="meta.id")
    recs = read_all(src)
    assert [r.get(S.TEXT) for r in recs] == ["Nested body one.", "Nested body two.", None, "The flat key wins."]
    assert [r.get(S.LABEL) for r in recs[:2]] == ["tech", "sport"] and recs[0][S.DOC_ID].endswith(":a1")
    assert reasons(recs) == ["missing_text_field"]
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "n.parquet")  # struct columns
    recs = read_all(SourceConfig(path=str(tmp_path / "n.parquet"), text_field="content.body", label_field="meta.topic"))
    assert [(r[S.TEXT], r[S.LABEL]) for r in recs] == [("Nested body one.", "tech"), ("Nested body two.", "sport")]


def test_html_main_text(tmp_path):
    body = "<p>" + " ".join(["This is the main article text about trains and stations."] * 5) + "</p>"
    (tmp_path / "page.html").write_text(
        f"<html><head><title>T</title></head><body><nav>Home | About</nav><article>{body}</article>"
        "<footer>Copyright</footer></body></html>")
    (tmp_path / "empty.html").write_text("<html><body><script>var x = 1;</script></body></html>")
    recs = read_all(SourceConfig(path=str(tmp_path)))
    doc = next(r for r in recs if r.get(S.STATUS) is None)
    assert "main article text" in doc[S.TEXT] and "Home | About" not in doc[S.TEXT]
    assert reasons(recs) == ["html_no_main_text"]


def test_builtin_sources():
    bbc = expand_source(SourceConfig(path="bbc-news"))
    assert len(bbc) == 2225
    assert {t["label"] for t in bbc} == {"business", "entertainment", "politics", "sports", "tech"}
    chat = read_all(SourceConfig(path="chatterbot"))
    docs = [r for r in chat if r.get(S.STATUS) is None]
    assert len(docs) > 1500 and all(r[S.SOURCE] == "chatterbot" for r in docs)
    assert any("computer" in d[S.TEXT].lower() for d in docs)


def test_missing_path_and_bad_uri_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        expand_source(SourceConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="matched no files|no such file"):
        expand_source(SourceConfig(path=str(tmp_path / "*.jsonl")))
    with pytest.raises(ValueError, match="cannot reach|no such file|s3fs"):  # no credentials here
        expand_source(SourceConfig(path="s3://bucket/key.jsonl"))


def test_hidden_files_of_a_directory_or_glob_are_left_out_unless_the_path_names_them(tmp_path):
    """As ``datasets`` and ``pyarrow`` list a directory: a notebook's checkpoint copy of a data file
    (``.ipynb_checkpoints/train-checkpoint.jsonl``) would be read twice, ``.git`` objects rejected."""
    from pipeline.data.sources import data_files, file_set, input_exists, visible

    root = tmp_path / ".cache" / "data"  # hidden directories above the path given do not count
    (root / ".ipynb_checkpoints").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    for rel in ("a.jsonl", "b.jsonl", ".ipynb_checkpoints/a-checkpoint.jsonl", "__pycache__/x.jsonl", ".DS_Store"):
        (root / rel).write_text('{"text": "one"}\n')
    hidden: list[str] = []
    assert file_set(str(root), hidden) == [str(root / "a.jsonl"), str(root / "b.jsonl")] and len(hidden) == 3
    assert file_set(str(root / "*.jsonl")) == [str(root / "a.jsonl"), str(root / "b.jsonl")]
    assert file_set(str(root / ".ipynb_checkpoints" / "*.jsonl")) == [str(root / ".ipynb_checkpoints/a-checkpoint.jsonl")]
    assert len(file_set(str(root / ".*" / "*.jsonl"))) == 1  # a glob of hidden names reads them
    bad: list[dict] = []
    assert data_files(str(root), ("jsonl",), "a JSONL file", bad) == [str(root / "a.jsonl"), str(root / "b.jsonl")]
    assert sorted(b["where"] for b in bad) == sorted(hidden) and all(b["reason"].startswith("hidden") for b in bad)
    tasks, n = visible(expand_source(SourceConfig(path=str(root))))
    assert [t["rel"] for t in tasks] == ["a.jsonl", "b.jsonl"] and n == 3
    (tmp_path / "h").mkdir()  # nothing but hidden files: a clear error, not "not found" or "no rows"
    (tmp_path / "h" / ".a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "h" / ".b.jsonl").write_text('{"text": "two"}\n')
    for path in (tmp_path / "h", tmp_path / "h" / "*.jsonl"):
        assert input_exists(str(path))
        with pytest.raises(ValueError, match=r"no file to read: its 2 files are hidden .* unless the path names them"):
            data_files(str(path), ("jsonl",), "a JSONL file", [])
    assert data_files(str(tmp_path / "h" / ".*.jsonl"), ("jsonl",), "a JSONL file", []) == \
        [str(tmp_path / "h" / ".a.jsonl"), str(tmp_path / "h" / ".b.jsonl")]
    # names relative to the directories before the first wildcard, a bracket's too (was ../a.jsonl)
    for d in ("a", "b"):
        (tmp_path / "g" / d).mkdir(parents=True)
        (tmp_path / "g" / d / "x.jsonl").write_text('{"text": "one"}\n')
    assert [t["rel"] for t in expand_source(SourceConfig(path=str(tmp_path / "g" / "[ab]" / "x.jsonl")))] == \
        ["a/x.jsonl", "b/x.jsonl"]
    only = expand_source(SourceConfig(path=str(root / ".DS_Store"), format="text"))
    assert visible(only) == (only, 0)  # a hidden file named as the source is read


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_byte_order_mark_names_the_encoding(tmp_path, encoding):
    """Files saved as UTF-16 / UTF-32 by Windows tools (PowerShell, Notepad) start with a byte-order
    mark: with the default encoding every format reads them, as the prepare stage, fine-tuning and
    evaluation do; bytes that break the encoding reject only their line."""
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")

    def write(name: str, text: str) -> str:
        (tmp_path / name).write_bytes(bom + text.encode(encoding))
        return str(tmp_path / name)

    doc = "Ünïcode text, saved by a Windows tool."
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=write("a.txt", doc)))] == [doc]
    jsonl = write("b.jsonl", f'{{"text": "{doc}", "label": "x"}}\r\n\r\n{{"text": "second", "label": "y"}}\r\n')
    assert [(r[S.TEXT], r[S.LABEL]) for r in read_all(SourceConfig(path=jsonl, label_field="label"))] == \
        [(doc, "x"), ("second", "y")]
    csv_path = write("c.csv", f'text,label\r\n"{doc}",x\r\n"two, lines\r\nin one field",y\r\n')
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=csv_path, label_field="label"))] == \
        [doc, "two, lines\r\nin one field"]
    array = write("d.json", f'  [{{"text": "{doc}"}}, {{"text": "second"}}]')
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=array))] == [doc, "second"]
    bad: list = []
    assert [obj["label"] for _, obj in json_records(jsonl, bad)] == ["x", "y"] and not bad
    assert [t for _, t in text_lines(write("e.txt", "one\r\n\r\ntwo\n"))] == ["one", "two"]
    if encoding == "utf-16":  # a lone high surrogate (D800) and an odd last byte: those lines only
        (tmp_path / "f.jsonl").write_bytes(codecs.BOM_UTF16_LE + '{"text": "ok"}\n'.encode("utf-16-le")
                                           + b"\x00\xd8" + '{"text": "x"}\n{"text": "fine"}\n'.encode("utf-16-le") + b"\x41")
        recs = read_all(SourceConfig(path=str(tmp_path / "f.jsonl")))
        assert [r[S.TEXT] if r.get(S.STATUS) is None else r[S.REASON] for r in recs] == \
            ["ok", "invalid_encoding", "fine", "invalid_encoding"]


def test_corrupt_file_is_quarantined_not_raised(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    recs = read_all(SourceConfig(path=str(tmp_path)))
    assert reasons(recs) == ["unreadable_file", "unreadable_file"]


def test_source_encoding(tmp_path):
    """Files in a legacy encoding: quarantined as invalid UTF-8 with a hint by default, read with the
    source's ``encoding``; bytes that encoding cannot decode are quarantined as invalid_encoding;
    an unknown encoding is a config error naming the key."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes("Café au lait, naïve résumé.".encode("latin-1"))
    (tmp_path / "r.jsonl").write_bytes('{"text": "Smörgåsbord for two."}\n'.encode("cp1252"))
    (tmp_path / "c.csv").write_bytes('text,label\n"Garçon, the bill.",food\n'.encode("cp1252"))
    (tmp_path / "bad.txt").write_bytes(b"\x81\x8d undefined in cp1252")

    recs = read_all(SourceConfig(path=str(tmp_path / "t")))
    assert reasons(recs) == ["invalid_utf8"] and "set the source's encoding" in recs[0][S.DETAIL]
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=str(tmp_path / "t"), encoding="latin-1"))] == \
        ["Café au lait, naïve résumé."]
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=str(tmp_path / "r.jsonl"), encoding="cp1252"))] == \
        ["Smörgåsbord for two."]
    assert [(r[S.TEXT], r[S.LABEL]) for r in read_all(SourceConfig(path=str(tmp_path / "c.csv"), encoding="cp1252",
                                                                    label_field="label"))] == [("Garçon, the bill.", "food")]
    assert reasons(read_all(SourceConfig(path=str(tmp_path / "bad.txt"), encoding="cp1252"))) == ["invalid_encoding"]
    # an encoding whose newlines are not newline bytes, named by the source: JSON Lines still read line by line
    (tmp_path / "u16.jsonl").write_bytes('{"text": "a"}\r\n{"text": "b"}\n'.encode("utf-16-le"))
    assert [r[S.TEXT] for r in read_all(SourceConfig(path=str(tmp_path / "u16.jsonl"), encoding="utf-16-le"))] == ["a", "b"]
    with pytest.raises(ValueError, match="sources\\[\\].encoding"):
        SourceConfig(path="x", encoding="klingon-8")
