import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from jobs.prepare import parse_config
from pipeline.config import config_hash, from_dict, load_config, parse_override
from pipeline.data.prepare import PrepareConfig

PREPARE_DEMO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "prepare_demo.yaml"
CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("jobs", "configs").glob("*.yaml"))


@dataclass(frozen=True, kw_only=True)
class Inner:
    size: int = 1
    rate: float = 0.5
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_nested_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  size: 3\n")
    cfg = load_config(Outer, path, ["inner.rate=2", "tags=[p, q]", "limit=null", "inner.kind=b"])
    assert cfg == Outer(name="y", inner=Inner(size=3, rate=2.0, kind="b"), tags=["p", "q"], limit=None)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "x"}, "nmae"),
        ({"inner": {"sise": 2}}, "inner.sise"),
        ({"inner": {"size": "big"}}, "inner.size"),
        ({"inner": {"size": True}}, "inner.size"),
        ({"inner": {"kind": "c"}}, "inner.kind"),
        ({"tags": "notalist"}, "tags"),
        ({"limit": 1.5}, "limit"),
        ({"inner": {"rate": "fast"}}, "inner.rate"),
        ({"inner": {"rate": "1e"}}, "inner.rate"),
        ({"inner": {"size": "2.5e0"}}, "inner.size"),  # an integer key takes integral values only
        ({"inner": {"size": float("nan")}}, "inner.size"),
    ],
)
def test_bad_keys_and_types_name_the_key(data, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        from_dict(Outer, data)


def test_a_malformed_or_non_utf8_config_file_is_an_error_naming_it(tmp_path):
    """Not a traceback from the YAML parser: the file, and where it breaks."""
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    (tmp_path / "tabs.yaml").write_text("a:\n\tb: 1\n")
    (tmp_path / "utf16.yaml").write_bytes("a: 1\n".encode("utf-16"))
    for name, message in (("broken", "not valid YAML: .* line 2"), ("tabs", "not valid YAML: .* line 2"),
                          ("utf16", "not UTF-8 text")):
        with pytest.raises(ValueError, match=f"config file .*{name}.yaml is {message}"):
            load_config(Outer, tmp_path / f"{name}.yaml")


def test_exponent_numbers_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads "2e-3" as a string; a float key takes it as the number it is
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 2e-3\n")
    assert load_config(Outer, path).inner.rate == 0.002
    assert load_config(Outer, path, ["inner.rate=-1.5E2"]).inner.rate == -150.0
    assert load_config(Outer, path, ["inner.rate=.5e1"]).inner.rate == 5.0
    # an integer key takes an integral value however it is written: 1e3 (a string to PyYAML), 1000.0
    assert load_config(Outer, path, ["inner.size=1e3"]).inner.size == 1000
    assert from_dict(Outer, {"inner": {"size": 1000.0}}).inner == Inner(size=1000)


def test_integer_keys_of_a_mapping_come_through_yaml_and_overrides(tmp_path):
    """YAML reads ``{2: 0.25}`` with an integer key, an override's key is a string: both set the
    n-gram rule (before, every YAML mapping of n-gram limits was refused: its keys became strings
    when the overrides were applied)."""
    from jobs.prepare import parse_config

    path = tmp_path / "p.yaml"
    path.write_text("sources: [{name: a, path: /x}]\n"
                    "quality:\n  gopher_repetition:\n    top_ngram_max_frac: {2: 0.25, 3: 0.2}\n")
    rules = parse_config(["--config", str(path), "quality.gopher_repetition.top_ngram_max_frac.4=0.1"]).quality
    assert rules.gopher_repetition.top_ngram_max_frac == {2: 0.25, 3: 0.2, 4: 0.1}
    with pytest.raises(ValueError, match="top_ngram_max_frac: expected an integer, got 'two'"):
        parse_config(["--config", str(path), "quality.gopher_repetition.top_ngram_max_frac.two=0.1"])


def test_a_missing_required_key_is_named():
    @dataclass(frozen=True, kw_only=True)
    class Needs:
        data: str
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(ValueError, match=r"^missing required config key\(s\): data$"):
        from_dict(Needs, {"inner": {}})
    with pytest.raises(ValueError, match=r"missing required config key\(s\): outer.data"):
        from_dict(Needs, {}, prefix="outer")


def test_override_syntax():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(ValueError):
        parse_override("novalue")


def test_overrides_index_into_lists():
    from pipeline.config import apply_overrides

    data = {"models": [{"name": "a", "threads": 1}, {"name": "b"}], "tags": ["x", "y"], "n": 3}
    out = apply_overrides(data, ["models.1.threads=2", "models.0.autoscaling.max_replicas=4", "tags.0=z"])
    assert out["models"] == [{"name": "a", "threads": 1, "autoscaling": {"max_replicas": 4}}, {"name": "b", "threads": 2}]
    assert out["tags"] == ["z", "y"] and data["models"][1] == {"name": "b"}  # the input is not changed
    assert apply_overrides(data, ["models[1].threads=2", "models[0].autoscaling.max_replicas=4", "tags[0]=z"]) == out
    assert parse_override("a[2][0].b=1") == (["a", "2", "0", "b"], 1)
    for bad in ("models[x].threads=1", "models[-1].threads=1", "models[0]x=1", "models].a=1"):
        with pytest.raises(ValueError, match="a list index is a number"):
            parse_override(bad)
    for bad, match in (("models.2.threads=1", "list of 2; '2'"), ("models.x.threads=1", "'x' is not an index"),
                       ("n.k=1", r"n is 3, not a mapping or a list \(replace it whole: n=...\)"),
                       ("tags.0.k=1", "tags.0 is 'x', not a mapping")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(data, [bad])


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(Outer(inner=Inner(size=2)))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads(path):
    """Each shipped YAML is loaded by the job it belongs to (named by the file's prefix)."""
    import importlib

    job = importlib.import_module(f"jobs.{path.name.split('_')[0]}")
    cfg = job.parse_config(["--config", str(path)])
    assert type(cfg).__name__.lower().startswith(path.name.split("_")[0])


def test_prepare_config_validation_names_keys(tmp_path):
    with pytest.raises(ValueError, match="pack.seq_len"):
        parse_config(["--config", str(PREPARE_DEMO), "pack.seq_len=0"])
    with pytest.raises(ValueError, match="quality.gopher_quality.min_wrds"):
        parse_config(["--config", str(PREPARE_DEMO), "quality.gopher_quality.min_wrds=3"])
    with pytest.raises(ValueError, match="dedup.fuzzy.bands"):
        parse_config(["--config", str(PREPARE_DEMO), "dedup.fuzzy.bands=100"])
    cfg = parse_config(["--config", str(PREPARE_DEMO), "--input", str(tmp_path), "--output", "/tmp/x"])
    assert [s.path for s in cfg.sources] == [str(tmp_path)] and cfg.output_dir == "/tmp/x"
    # overrides reach the sources --input gives, a string source being {path: it}
    cfg = parse_config(["--config", str(PREPARE_DEMO), "--input", str(tmp_path), "--input", "chatterbot",
                        "sources.0.text_field=body", "sources.0.name=mine"])
    assert [(s.path, s.text_field, s.source_name) for s in cfg.sources][0] == (str(tmp_path), "body", "mine")
    assert cfg.sources[1].path == "chatterbot" and cfg.sources[1].text_field == "text"
    with pytest.raises(ValueError, match=r"sources\[0\].text_fild"):
        parse_config(["--config", str(PREPARE_DEMO), "--input", str(tmp_path), "sources.0.text_fild=body"])


def test_every_job_runs_without_a_config_file_on_its_defaults_and_overrides(tmp_path):
    """``--config`` is optional: without it a job starts from its config class's defaults; a
    required key it lacks is named."""
    import jobs.finetune
    import jobs.pretrain

    cfg = parse_config(["--input", str(tmp_path), "--output", "/tmp/x", "tokenizer.vocab_size=500"])
    assert [s.path for s in cfg.sources] == [str(tmp_path)] and cfg.tokenizer.vocab_size == 500
    assert cfg.pack == from_dict(PrepareConfig, {"sources": ["bbc-news"]}).pack  # the rest at its defaults
    with pytest.raises(ValueError, match="missing required config key.*sources"):
        parse_config([])
    pre = jobs.pretrain.parse_config(["data=/d", "model.preset=tiny"])
    assert pre.data == "/d" and pre.model.preset == "tiny" and pre.train.max_steps == 1000
    with pytest.raises(ValueError, match="missing required config key.*base_model, data"):
        jobs.finetune.parse_config(["task=sft"])


def test_output_dir_depends_on_result_fields_only():
    base = from_dict(PrepareConfig, {"sources": ["bbc-news"]})
    faster = from_dict(PrepareConfig, {"sources": ["bbc-news"], "runtime": {"read_bundle_bytes": 1000}})
    other = from_dict(PrepareConfig, {"sources": ["bbc-news"], "pack": {"seq_len": 64}})
    assert base.run_dir == faster.run_dir
    assert base.run_dir != other.run_dir


def test_sources_need_distinct_names(tmp_path):
    with pytest.raises(ValueError, match="distinct 'name'"):
        from_dict(PrepareConfig, {"sources": [str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")]})
    cfg = from_dict(PrepareConfig, {"sources": [{"path": "a/x.jsonl", "name": "a"}, {"path": "b/x.jsonl", "name": "b"}]})
    assert [s.source_name for s in cfg.sources] == ["a", "b"]
    # a glob's default name: its directory and what its pattern names (was "_" and "_.rst" here)
    globs = from_dict(PrepareConfig, {"sources": ["docs/**/*.md", {"path": "docs/**/*.rst", "format": "text"},
                                                  "s3://b/x/part-[0-9]*.jsonl.gz", "*.txt"]})
    assert [s.source_name for s in globs.sources] == ["docs-md", "docs-rst", "x-part-jsonl-gz", "txt"]
    with pytest.raises(ValueError, match="sources must list"):
        from_dict(PrepareConfig, {"sources": []})


def test_optional_sections_report_the_inner_key():
    from jobs.evaluate import parse_config as parse_eval

    with pytest.raises(ValueError, match=r"lm\.modell"):
        parse_eval(["--config", "jobs/configs/evaluate_demo.yaml", "lm.modell=3"])
    cfg = parse_eval(["--config", "jobs/configs/evaluate_demo.yaml", "bias=null", "fewshot=null"])
    assert cfg.bias is None and cfg.fewshot is None and cfg.lm is not None


def test_training_jobs_check_their_data_before_ray_starts(tmp_path, monkeypatch, capsys):
    """A missing prepare output is reported by the pretrain and tune jobs before they connect
    to (or start) a cluster."""
    import jobs.pretrain
    import jobs.tune
    import pipeline.ray_utils

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the data check")

    monkeypatch.setattr(pipeline.ray_utils, "init_ray", no_ray)
    missing = tmp_path / "nothing-here"
    assert jobs.pretrain.main(["--config", "jobs/configs/pretrain_demo.yaml", f"data={missing}"]) == 2
    assert f"data: {missing} is not a finished prepare output" in capsys.readouterr().err
    (tmp_path / "base.yaml").write_text(f"data: {missing}\nmodel: {{preset: tiny}}\n")
    assert jobs.tune.main(["--config", "jobs/configs/tune_demo.yaml", f"base={tmp_path / 'base.yaml'}",
                           f"output_dir={tmp_path / 'tune'}"]) == 2
    assert f"data: {missing} is not a finished prepare output" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()


def test_a_finetune_yaml_names_its_exported_model_wherever_a_model_is_taken(tmp_path):
    """Evaluation, fine-tuning and the sweep take a model as a directory or as the config YAML that
    made it: a finetune YAML (it has a ``task``) names its run's exported model."""
    from pipeline.finetune.finetune import resolve_finetuned, resolve_model_dir

    (tmp_path / "base").mkdir()
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"task: sft\nbase_model: {tmp_path / 'base'}\noutput_dir: {tmp_path / 'out'}\ndata: {{train: chatterbot}}\n")
    assert resolve_model_dir(str(ft)) == resolve_finetuned(str(ft)).resolve()
    assert resolve_model_dir(str(ft)).parent.parent == tmp_path / "out"


@dataclass(frozen=True, kw_only=True)
class Either:
    value: int | str | None = None
    pairs: dict[str, tuple[int, float]] = field(default_factory=dict)


def test_unions_mappings_and_fixed_tuples_are_checked_by_key():
    assert from_dict(Either, {"value": 3}).value == 3 and from_dict(Either, {"value": "3a"}).value == "3a"
    assert from_dict(Either, {"value": None}).value is None
    with pytest.raises(ValueError, match=r"^value: expected int \| str \| None, got \[1\]"):
        from_dict(Either, {"value": [1]})
    assert from_dict(Either, {"pairs": {"a": [1, 2]}}).pairs == {"a": (1, 2.0)}
    with pytest.raises(ValueError, match=r"pairs\.a: expected 2 items, got 3"):
        from_dict(Either, {"pairs": {"a": [1, 2, 3]}})
    with pytest.raises(ValueError, match=r"pairs\.a\[1\]: expected a number, got 'x'"):
        from_dict(Either, {"pairs": {"a": [1, "x"]}})
    with pytest.raises(ValueError, match=r"pairs: expected a mapping, got \[1\]"):
        from_dict(Either, {"pairs": [1]})


def test_keys_added_later_stay_out_of_run_hashes_at_their_defaults():
    from pipeline.config import without_defaults

    data = {"aux": 0.0, "lr": 1e-3, "train": {"average_last": 0.0, "max_steps": 10}, "run": None}
    later = {"aux": 0.0, "train": {"average_last": 0.0}, "missing": 1}
    assert without_defaults(data, later) == {"lr": 1e-3, "train": {"max_steps": 10}, "run": None}
    changed = {**data, "aux": 0.5, "train": {"average_last": 0.3, "max_steps": 10}}
    assert without_defaults(changed, later) == changed  # set: part of the run's identity
    assert data["train"] == {"average_last": 0.0, "max_steps": 10}  # the input is not modified


@pytest.mark.parametrize(
    "job, config, override, key",
    [
        ("pretrain", "pretrain_demo", "train.seed=-1", "train.seed"),
        ("pretrain", "pretrain_demo", "train.seed=4294967296", "train.seed"),
        ("pretrain", "pretrain_demo", "model.n_embd=0", "model.n_embd"),
        ("pretrain", "pretrain_demo", "model.n_head=0", "model.n_head"),
        # RoPE needs an even head size: 12 / 4 = 3 failed inside the first forward pass
        ("pretrain", "pretrain_demo", "model.arch=llama model.n_embd=12 model.n_head=4", "model.n_embd"),
        ("finetune", "finetune_classify_demo", "train.seed=-5", "train.seed"),
        ("evaluate", "evaluate_demo", "lm.seed=-1", "lm.seed"),
        ("evaluate", "evaluate_demo", "lm.text_field=body", "lm.text_field"),  # lm.data's shards have no field
        ("evaluate", "evaluate_demo", "lm.data=null lm.text_file=t.txt lm.split=test", "lm.split"),
        ("evaluate", "evaluate_demo", "fewshot.seed=-1", "fewshot.seed"),
        ("evaluate", "evaluate_demo", "fewshot.window_overlap=-1", "fewshot.window_overlap"),
        ("evaluate", "evaluate_demo", "fewshot.window_overlap=256", "fewshot.window_overlap"),
        ("tune", "tune_demo", "seed=-1", "seed"),
        ("compress", "compress_demo", "eval.seed=-1", "eval.seed"),
        ("compress", "compress_demo", "eval.decode_prompt=''", "eval.decode_prompt"),
        ("pretrain", "pretrain_demo", "run.fail_at_step=-1", "run.fail_at_step"),
        # a value for another method than the variant's is still checked
        ("compress", "compress_demo", "variants.0.mlp_keep=-0.5", "mlp_keep"),
        ("compress", "compress_demo", "variants.1.sparsity=1.5", "sparsity"),
        ("compress", "compress_demo", "variants.2.heads_keep=0", "heads_keep"),
        ("prepare", "prepare_demo", "dedup.fuzzy.seed=-1", "dedup.fuzzy.seed"),
        ("prepare", "prepare_demo", "dedup.fuzzy.num_partitions=0", "dedup.fuzzy.num_partitions"),
        ("prepare", "prepare_demo", "tokenizer.max_train_docs=0", "tokenizer.max_train_docs"),
        ("prepare", "prepare_demo", "quality.gopher_quality.min_words=-5", "quality.gopher_quality.min_words"),
        ("prepare", "prepare_demo", "quality.gopher_quality.min_words=200 quality.gopher_quality.max_words=100",
         "quality.gopher_quality.min_words"),
        ("prepare", "prepare_demo", "quality.gopher_quality.min_alpha_words_ratio=1.5",
         "quality.gopher_quality.min_alpha_words_ratio"),
        ("prepare", "prepare_demo", "quality.gopher_repetition.max_dup_line_frac=-0.1",
         "quality.gopher_repetition.max_dup_line_frac"),
        ("prepare", "prepare_demo", "quality.c4.min_sentences=-1", "quality.c4.min_sentences"),
        ("prepare", "prepare_demo", "quality.fineweb.max_short_line_ratio=2", "quality.fineweb.max_short_line_ratio"),
        ("prepare", "prepare_demo", "quality.fineweb.short_line_length=-1", "quality.fineweb.short_line_length"),
        # a run's name is one directory of its path: no separator, not empty, not ".." (outside output_dir)
        *[(job, config, f"name={bad}", message)
          for job, config in (("prepare", "prepare_demo"), ("pretrain", "pretrain_demo"), ("finetune", "finetune_sft_demo"),
                              ("evaluate", "evaluate_demo"), ("tune", "tune_demo"), ("compress", "compress_demo"))
          for bad, message in (("a/b", "name must be a plain, non-empty name"), ("..", "name must be a plain, non-empty name"),
                               ("''", "name must be a plain, non-empty name"))],
        # no number is infinite or NaN (YAML's .inf, or 1e999): an infinite rate or weight gave NaN losses
        ("pretrain", "pretrain_demo", "optim.lr=.inf", "optim.lr: expected a finite number"),
        ("pretrain", "pretrain_demo", "optim.weight_decay=1e999", "optim.weight_decay: expected a finite number"),
        ("finetune", "finetune_classify_demo", "aux_lm_weight=.inf", "aux_lm_weight: expected a finite number"),
        ("finetune", "finetune_sft_demo", "scaling.cpus_per_worker=.inf", "scaling.cpus_per_worker: expected a finite"),
        ("prepare", "prepare_demo", "quality.gopher_repetition.top_ngram_max_frac.2=.nan",
         "quality.gopher_repetition.top_ngram_max_frac.2: expected a finite number"),
        # a URI where a local directory is written or read as a tree (output_dir=s3://... made a local "s3:")
        *[(job, config, f"{key}={uri}", f"{key}: {uri} is a URI, but {key} names a local directory")
          for job, config, key in (("prepare", "prepare_demo", "output_dir"), ("pretrain", "pretrain_demo", "output_dir"),
                                   ("pretrain", "pretrain_demo", "data"), ("pretrain", "pretrain_demo", "init_from"),
                                   ("finetune", "finetune_sft_demo", "output_dir"),
                                   ("finetune", "finetune_sft_demo", "base_model"), ("evaluate", "evaluate_demo", "lm.model"),
                                   ("evaluate", "evaluate_demo", "lm.data"), ("evaluate", "evaluate_demo", "bias.model"),
                                   ("evaluate", "evaluate_demo", "classification.model"), ("tune", "tune_demo", "output_dir"),
                                   ("compress", "compress_demo", "eval.lm_data"))
          for uri in ("s3://bucket/runs", "gs://bucket/runs")],
        ("compress", "compress_demo", "models.0.path=s3://b/m", "models[base].path: s3://b/m is a URI"),
        ("serve", "serve_demo", "models.0.path=s3://b/m", "models[base].path: s3://b/m is a URI"),
        ("evaluate", "evaluate_demo", "output_dir=file:///shared/eval", "write it as a path, /shared/eval"),
        # an empty string anywhere (an empty path would read the working directory)
        ("finetune", "finetune_classify_demo", "data.train=''", "data.train: expected a non-empty string"),
        ("evaluate", "evaluate_demo", "bias.pairs_path=''", "bias.pairs_path: expected a non-empty string"),
    ],
)
def test_out_of_range_values_name_the_key(job, config, override, key):
    """Values of the right type but outside what the stage can use are refused when the config is
    read, before Ray starts, naming the key (a negative seed, say, failed deep inside numpy on a
    Ray worker)."""
    import importlib

    parse = importlib.import_module(f"jobs.{job}").parse_config
    path = str(PREPARE_DEMO.parent / f"{config}.yaml")
    with pytest.raises(ValueError, match=re.escape(key)):
        parse(["--config", path, *override.split()])


def test_a_compress_variant_or_model_name_is_one_path_component():
    from jobs.compress import parse_config

    for override in ("variants.0.name=..", "models.0.name=a/b"):
        with pytest.raises(ValueError, match=r"(variants|models)\[\]\.name must be a plain, non-empty name"):
            parse_config(["--config", str(PREPARE_DEMO.parent / "compress_demo.yaml"), override])


def test_an_empty_string_is_refused_in_lists_too_and_after_a_key_s_own_check():
    """A blank list item names its index; a key whose own check says more (serve's host) keeps its message."""
    import re

    from jobs.prepare import parse_config
    from pipeline.serve.app import ServeConfig

    with pytest.raises(ValueError, match=re.escape("harmful.extra_terms[1]: expected a non-empty string, got ' '")):
        parse_config(["--config", str(PREPARE_DEMO), "harmful.extra_terms=[spam, ' ']"])
    with pytest.raises(ValueError, match="host must be set"):
        from_dict(ServeConfig, {"models": [{"name": "a", "path": "x"}], "host": " "})
