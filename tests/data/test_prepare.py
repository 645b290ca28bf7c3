"""The prepare stage end to end on a local Ray cluster: a small mixed corpus with planted
duplicates and bad records; manifest invariant; loadable outputs; rerun and interrupted run."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.config import from_dict
from pipeline.data import prepare as prepare_mod
from pipeline.data import ray_ops
from pipeline.data.prepare import PrepareConfig, run_prepare
from tests.helpers import document

pytestmark = pytest.mark.usefixtures("ray_session")

def perturb(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), 3):
        words[i] = "changed"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    docs = [document(rng) for _ in range(60)]
    lines = [json.dumps({"text": t}) for t in docs]
    lines.append(json.dumps({"text": docs[0]}))  # exact duplicate of line 1
    lines.append(json.dumps({"text": perturb(rng, docs[1])}))  # near duplicate of line 2
    lines.append(json.dumps({"text": document(rng) + "\n\nContact jane.doe@example.com or call 555-123-4567."}))
    lines.append("{malformed json")
    lines.append(json.dumps({"text": ""}))
    lines.append(json.dumps({"text": "Too short."}))
    lines.append(json.dumps({"text": "Le conseil municipal a visité le nouveau marché. " * 12}))
    lines.append(json.dumps({"text": document(rng) + " Visit our online casino and buy viagra today."}))
    (root / "news.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    rows = ["text,topic"] + [f'"{document(rng, 2)}",{rng.choice(["a", "b"])}' for _ in range(30)]
    (root / "labeled.csv").write_text("\n".join(rows) + "\n")
    # an evaluation set holding 20 words of line 11 (decontamination: it shares 13-grams with it)
    (root / "eval.jsonl").write_text(json.dumps({"question": " ".join(docs[10].split()[5:25])}) + "\n")
    return {"root": root, "docs": docs}


def config(corpus: dict, out: Path, **extra) -> PrepareConfig:
    data = {
        "name": "t",
        "output_dir": str(out),
        "sources": [{"path": str(corpus["root"] / "news.jsonl")},
                    {"path": str(corpus["root"] / "labeled.csv"), "label_field": "topic"}],
        "tokenizer": {"vocab_size": 500},
        "pack": {"seq_len": 64, "docs_per_shard": 25},
        "split": {"val_fraction": 0.1, "test_fraction": 0.2},
        "decontam": {"enabled": True, "eval_paths": [str(corpus["root"] / "eval.jsonl")], "text_field": "question"},
    }
    data.update(extra)
    return from_dict(PrepareConfig, data)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = config(corpus, out)
    return cfg, run_prepare(cfg)


def test_manifest_counts_and_invariant(prepared):
    cfg, m = prepared
    c = m["counts"]
    assert c["input_docs"] == 69 + 31 - 1  # 69 JSONL records (+1 invalid UTF-8 line), 30 CSV rows
    assert c["input_docs"] == c["kept_docs"] + sum(c["dropped"].values()) + c["quarantined"]
    assert c["quarantined_by_reason"] == {"empty_text": 1, "invalid_utf8": 1, "malformed_json": 1}
    assert c["dropped"]["exact_duplicate"] == 1 and c["dropped"]["fuzzy_duplicate"] == 1
    assert c["dropped"]["gopher_quality:min_words"] == 1
    assert c["dropped"]["gopher_repetition:top_2gram_frac"] == 1  # the French line repeated 12 times
    assert c["dropped"]["harmful:blocklist"] == 1
    assert c["dropped"]["decontaminated"] == 1
    assert m["duplicates"] == {"exact": 1, "fuzzy": 1}
    assert set(c["kept_by_split"]) <= {"train", "val", "test"} and c["kept_by_split"]["train"] > 40
    assert Path(m["output_dir"]) == cfg.run_dir and (cfg.run_dir / "manifest.json").exists()
    for key in ("config", "versions", "tokenizer", "shards", "tokens"):
        assert key in m
    assert (cfg.run_dir / m["report"]).exists()
    for png in ("doc_length.png", "drops_per_reason.png", "tokens_per_source.png"):
        assert (cfg.run_dir / "report" / png).stat().st_size > 1000


def test_audit_tables(prepared):
    cfg, m = prepared
    removed = pq.read_table(cfg.run_dir / m["removed"]).to_pylist()
    assert len(removed) == sum(m["counts"]["dropped"].values())
    exact = [r for r in removed if r[S.REASON] == "exact_duplicate"]
    assert exact[0][S.DOC_ID] == "news:news.jsonl:61" and exact[0][S.REPRESENTATIVE] == "news:news.jsonl:1"
    fuzzy = [r for r in removed if r[S.REASON] == "fuzzy_duplicate"]
    assert fuzzy[0][S.DOC_ID] == "news:news.jsonl:62" and fuzzy[0][S.REPRESENTATIVE] == "news:news.jsonl:2"
    assert fuzzy[0][S.CLUSTER_ID] and fuzzy[0][S.SIMILARITY] >= 0.8
    assert [r[S.DOC_ID] for r in removed if r[S.REASON] == "decontaminated"] == ["news:news.jsonl:11"]
    quarantine = pq.read_table(cfg.run_dir / m["quarantine"]).to_pylist()
    assert sorted(q[S.REASON] for q in quarantine) == ["empty_text", "invalid_utf8", "malformed_json"]
    final = pq.read_table(cfg.run_dir / "_work" / "final").to_pylist()
    pii = next(r for r in final if r[S.DOC_ID] == "news:news.jsonl:63")
    assert "<EMAIL>" in pii[S.TEXT] and "<PHONE>" in pii[S.TEXT] and pii[S.PII_EMAIL] == 1 and pii[S.PII_PHONE] == 1


def test_shards_and_tokenizer_load(prepared):
    import datasets
    from transformers import AutoTokenizer

    cfg, m = prepared
    run = cfg.run_dir
    tok = AutoTokenizer.from_pretrained(m["tokenizer"], local_files_only=True)
    train = [str(run / s["path"]) for s in m["shards"] if s["split"] == "train"]
    assert len(train) >= 2  # docs_per_shard=25
    ds = datasets.load_dataset("parquet", data_files={"train": train}, split="train")
    assert len(ds) == sum(s["rows"] for s in m["shards"] if s["split"] == "train")
    assert all(len(x) == 64 for x in ds["input_ids"])
    assert m["tokens"]["train"] == len(ds) * 64
    for split in ("train", "val", "test"):
        stats = m["tokens"]["per_split"][split]
        assert stats["documents"] == stats["packed"] + stats["remainder"]
        assert stats["num_docs"] == m["counts"]["kept_by_split"].get(split, 0)
        # one shard per 25 consecutive documents, the last the rest, whatever blocks Ray Data read
        groups = [g["num_docs"] for g in json.loads((run / split / "_shards.json").read_text())]
        n = stats["num_docs"]
        assert groups == ([25] * (n // 25) + ([n % 25] if n % 25 else [])), (split, groups)
    text = tok.decode(pq.read_table(train[0]).column("input_ids")[0].as_py())
    assert " of the " in text
    assert sorted(p.name for p in (run / "train").glob("*.parquet")) == sorted(Path(p).name for p in train)
    labeled = pq.read_table(run / "labeled" / "train.parquet")
    assert set(labeled.column(S.LABEL).to_pylist()) == {"a", "b"}
    assert set(labeled.column(S.SOURCE).to_pylist()) == {"labeled"}
    assert "test" in m["counts"]["kept_by_split"]  # labeled sources get a test split
    news_splits = {r[S.SPLIT] for r in pq.read_table(run / "_work" / "final").to_pylist()
                   if r[S.SOURCE] == "news" and r[S.STATUS] == "kept"}
    assert "test" not in news_splits


def test_rerun_is_not_recomputed(prepared, caplog):
    cfg, m = prepared
    before = (cfg.run_dir / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = run_prepare(cfg)
    assert again == m
    assert (cfg.run_dir / "manifest.json").stat().st_mtime_ns == before
    assert "already complete" in caplog.text


def test_interrupted_run_resumes_without_duplicates(corpus, tmp_path, monkeypatch, prepared):
    cfg = config(corpus, tmp_path)
    real = ray_ops.pack_shards

    def crash_on_val(ds, tokenizer_dir, seq_len, out_dir, docs_per_shard, bos_id):
        if out_dir.endswith("val.tmp"):
            Path(out_dir, "part-partial.parquet").write_bytes(b"half a file")
            raise RuntimeError("simulated crash")
        return real(ds, tokenizer_dir, seq_len, out_dir, docs_per_shard, bos_id)

    monkeypatch.setattr(ray_ops, "pack_shards", crash_on_val)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(cfg)
    assert not (cfg.run_dir / "manifest.json").exists()
    assert (cfg.run_dir / "train" / "_SUCCESS").exists() and (cfg.run_dir / "val.tmp").exists()
    train_files = sorted((cfg.run_dir / "train").iterdir())

    monkeypatch.setattr(ray_ops, "pack_shards", real)
    m = run_prepare(cfg)
    assert sorted((cfg.run_dir / "train").iterdir()) == train_files  # finished step reused as is
    assert not list(cfg.run_dir.glob("*.tmp")) and not list((cfg.run_dir / "_work").glob("*.tmp"))
    on_disk = sorted(str(p.relative_to(cfg.run_dir)) for p in cfg.run_dir.glob("*/shard-*.parquet"))
    assert on_disk == sorted(s["path"] for s in m["shards"])
    assert m["counts"] == prepared[1]["counts"] and m["tokens"]["train"] == prepared[1]["tokens"]["train"]


def test_job_entry_errors(tmp_path, capsys):
    from jobs.prepare import main

    out = tmp_path / "out"
    assert main(["--config", "jobs/configs/prepare_demo.yaml", "--input", str(tmp_path / "missing"), f"output_dir={out}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()  # a run that cannot start leaves no directory behind
    assert main(["--config", "jobs/configs/prepare_demo.yaml", "pack.sequence_len=3"]) == 2
    assert "pack.sequence_len" in capsys.readouterr().err
    # record keys for a source of text files (one document each): refused before any work, not ignored file by file
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("A document.")
    assert main(["--config", "jobs/configs/prepare_demo.yaml", "--input", str(tmp_path / "texts"),
                 "sources.0.label_field=topic", f"output_dir={out}"]) == 2
    assert "label_field names fields of records (JSONL, JSON, CSV, Parquet" in capsys.readouterr().err
    assert not out.exists()
    assert main(["--config", "jobs/configs/prepare_demo.yaml", "sources.0.text_field=body", f"output_dir={out}"]) == 2
    assert "sources[0] ('bbc-news'): text_field names fields of records" in capsys.readouterr().err


def test_a_corpus_the_filters_remove_entirely_is_a_clear_error(tmp_path):
    """Every document dropped (here: word salad without stop words) used to crash the exact-dedup
    shuffle on an empty dataset inside Ray; now the job stops after the clean step and names the
    reasons, the rows kept for inspection."""
    rng = random.Random(2)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    (tmp_path / "salad.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(80)) + "."}) + "\n" for _ in range(6)))
    (tmp_path / "empty.txt").write_text("")
    cfg = from_dict(PrepareConfig, {"name": "none", "output_dir": str(tmp_path / "out"), "sources": [str(tmp_path)],
                                    "language": {"enabled": False}, "tokenizer": {"vocab_size": 300}})
    with pytest.raises(ValueError, match=r"no document passed parsing and the filters \(7 records: "
                                         r"gopher_quality:min_stop_words 6, empty_text 1\)"):
        run_prepare(cfg)
    assert not (cfg.run_dir / "manifest.json").exists() and (cfg.run_dir / "_work" / "clean" / "_SUCCESS").exists()

    # documents kept, but every one in val: no tokenizer can be trained (it used to be trained on nothing)
    from pipeline.data.split import SplitConfig, split_for

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "d.jsonl").write_text(json.dumps({"text": document(rng, 3)}) + "\n")
    val = next(v / 100 for v in range(5, 95) if split_for("s:d.jsonl:1", False, SplitConfig(val_fraction=v / 100)) == "val")
    cfg = from_dict(PrepareConfig, {"name": "one", "output_dir": str(tmp_path / "out"),
                                    "sources": [{"path": str(tmp_path / "one"), "name": "s"}],
                                    "quality": {"gopher_repetition": {"enabled": False}, "fineweb": {"enabled": False}},
                                    "language": {"enabled": False}, "split": {"val_fraction": val}})
    with pytest.raises(ValueError, match=r"the train split is empty \(kept documents per split: \{'val': 1\}\)"):
        run_prepare(cfg)


def test_a_small_class_the_hash_leaves_out_of_test_is_given_a_test_document(tmp_path):
    """The hash split is not stratified: a class of 12 documents misses a 10% test split about
    one time in four. The labeled test split then has every class, the move is in the manifest
    and the report, and the moved document is in the test split everywhere (LM shards too)."""
    from pipeline.data.split import SplitConfig, split_for

    rng = random.Random(3)
    split = SplitConfig(val_fraction=0.05, test_fraction=0.10)
    rare = next(range(start, start + 12) for start in range(0, 100_000, 12)
                if "test" not in {split_for(f"lab:r{i}", True, split) for i in range(start, start + 12)})
    rows = [{"id": f"c{i}", "text": document(rng, 2), "topic": "common"} for i in range(40)]
    rows += [{"id": f"r{i}", "text": document(rng, 2), "topic": "rare"} for i in rare]
    (tmp_path / "lab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(PrepareConfig, {
        "name": "cover", "output_dir": str(tmp_path / "out"), "tokenizer": {"vocab_size": 400},
        "sources": [{"path": str(tmp_path / "lab.jsonl"), "name": "lab", "label_field": "topic", "id_field": "id"}],
        "split": {"val_fraction": 0.05, "test_fraction": 0.10}, "language": {"enabled": False},
        "dedup": {"fuzzy": {"enabled": False}}, "pack": {"seq_len": 64}})
    m = run_prepare(cfg)
    moves = [mv for mv in m["counts"]["split_moves"] if mv["label"] == "rare"]
    assert [(mv["from"], mv["to"]) for mv in moves if mv["to"] == "test"] == [("train", "test")]
    moved = next(mv["doc_id"] for mv in moves if mv["to"] == "test")
    test = pq.read_table(cfg.run_dir / "labeled" / "test.parquet")
    assert moved in test.column(S.DOC_ID).to_pylist() and "rare" in test.column(S.LABEL).to_pylist()
    train = pq.read_table(cfg.run_dir / "labeled" / "train.parquet").column(S.DOC_ID).to_pylist()
    assert moved not in train and len(set(train)) == len(train)
    assert sum(m["counts"]["kept_by_split"].values()) == m["counts"]["kept_docs"] == 52
    # the LM shards are cut from the same split column: their test documents are the labeled test split
    assert m["tokens"]["per_split"]["test"]["num_docs"] == test.num_rows == m["counts"]["kept_by_split"]["test"]
    assert f"{moved} (rare) to test" in (cfg.run_dir / m["report"]).read_text()
    from jobs.prepare import summary

    assert "rare to test" in summary(m).split("moved so that each class is in val / test: ")[1].splitlines()[0]
    counts = {**m["counts"], "quarantined_by_reason": {}}  # a corpus with nothing quarantined says so
    assert "  quarantined per reason: none\n" in summary({**m, "counts": counts})
    assert "  quarantined per reason:\n" in summary({**m, "counts": {**counts, "quarantined_by_reason": {"x": 1}}})
    # a corrected corpus file, rerun with the same config: the finished run is reused, and says why
    assert "inputs_changed" not in run_prepare(cfg)
    with (tmp_path / "lab.jsonl").open("a") as f:
        f.write(json.dumps({"id": "late", "text": document(rng, 2), "topic": "common"}) + "\n")
    again = run_prepare(cfg)
    assert [c.split(" (")[0] for c in again.pop("inputs_changed")] == ["sources[0]"] and again == m


def test_an_output_directory_and_hidden_files_inside_the_corpus_directory_are_not_read(tmp_path):
    """``--input . --output outputs``: a second run (another config) read the first run's shards,
    work files and labeled splits as documents (2,039 inputs for 40 documents in a probe). The files
    under output_dir are left out and counted, and so are hidden ones (a dataset cloned with git:
    its .git objects went to the quarantine); its own outputs are no change of input on a rerun."""
    rng = random.Random(5)
    corpus = tmp_path / "corpus"
    (corpus / ".git" / "objects").mkdir(parents=True)
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(document(rng, 3))
    (corpus / ".git" / "objects" / "ab12").write_bytes(b"\x78\x01binary")
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (corpus / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (corpus / ".hidden.txt").write_text(document(rng, 3))

    def cfg(vocab: int, **extra) -> PrepareConfig:
        return from_dict(PrepareConfig, {"name": "in", "output_dir": str(corpus / "out"), "sources": [str(corpus)],
                                         "language": {"enabled": False}, "tokenizer": {"vocab_size": vocab}, **extra})

    first = run_prepare(cfg(300))
    assert first["counts"]["input_docs"] == 12 and first["files_not_read"] == {"sources[0]": {"hidden": 4}}
    assert first["counts"]["quarantined"] == 0
    second = run_prepare(cfg(310))
    left = second["files_not_read"]["sources[0]"]
    assert second["counts"]["input_docs"] == 12 and left["hidden"] == 4 and left["under_output_dir"] > 10
    line = next(l for l in (cfg(310).run_dir / second["report"]).read_text().splitlines() if "files not read" in l)
    assert line.startswith("- files not read as documents: sources[0]: ") and \
        f"{left['under_output_dir']} under output_dir (earlier runs' outputs)" in line and "4 hidden (a name starting" in line
    from jobs.prepare import summary

    assert line[2:] in summary(second)
    assert "inputs_changed" not in run_prepare(cfg(310))  # its own outputs changed the directory, not its input
    # a hidden file the source names itself is read
    named = run_prepare(cfg(300, name="named", sources=[str(corpus / ".hidden.txt")], split={"val_fraction": 0.0}))
    assert named["counts"]["input_docs"] == 1 and named["files_not_read"] == {}
    # a source with nothing but outputs in it is an error before any work
    (tmp_path / "only" / "out").mkdir(parents=True)
    (tmp_path / "only" / "out" / "x.jsonl").write_text('{"text": "an earlier output"}\n')
    bad = from_dict(PrepareConfig, {"name": "x", "output_dir": str(tmp_path / "only" / "out"),
                                    "sources": [str(tmp_path / "only")]})
    with pytest.raises(ValueError, match=r"sources\[0\] .*no file to read: 1 under output_dir"):
        run_prepare(bad)
