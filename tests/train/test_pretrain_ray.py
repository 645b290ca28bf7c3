"""Pretraining on Ray Train (2 workers on the session's local cluster): every token once per
epoch, interrupted-run resume, recovery from a worker death, export loadable by from_pretrained."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import from_dict
from pipeline.train.pretrain import PretrainConfig, run_pretrain

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(600)]


def collect_rows(config: dict) -> dict:
    """Two epochs of this worker's training batches as the training loop iterates them
    (``shard_batches``: local shuffle, last batch partial), and its validation batches."""
    import ray.train

    from pipeline.train.data import LMBatcher
    from pipeline.train.loop import LoopConfig
    from pipeline.train.ray_train import shard_batches

    loop = LoopConfig(batch_size=config["batch_size"], shuffle_buffer=64)
    batcher = LMBatcher("causal")
    rows, batch_sizes, fillers = [], [], 0
    for epoch in range(2):
        for batch in shard_batches(ray.train.get_dataset_shard("train"), loop, "input_ids", batcher, epoch):
            real = (batch["labels"] != -100).any(-1)  # filler rows carry no label
            rows.extend((epoch, tuple(r.tolist())) for r in batch["input_ids"][real])
            fillers += int((~real).sum())
            batch_sizes.append(len(batch["input_ids"]))
    val = [tuple(r.tolist()) for b in shard_batches(ray.train.get_dataset_shard("val"), loop, "input_ids", batcher)
           for r in b["input_ids"][(b["labels"] != -100).any(-1)]]
    ray.train.report({"n": len(rows)})
    return {"rank": ray.train.get_context().get_world_rank(), "rows": rows, "batch_sizes": batch_sizes, "val": val,
            "fillers": fillers}


def test_two_workers_see_each_token_once_per_epoch(tiny_prepared, tmp_path):
    """Through the pipeline's read of the splits and the training loop's own batching, with a
    batch size that does not divide a worker's rows and splits whose rows do not divide between
    the workers: each epoch the two workers together see every training row exactly once (the
    last batch partial, no row skipped: a filler row without loss evens out the shares), in a
    different order per epoch, in the same number of batches; validation rows likewise, once."""
    import pyarrow as pa
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.ray_utils import read_parquet
    from pipeline.train.pretrain import split_files
    from pipeline.train.ray_train import ordered_data_config

    run_dir, manifest = tiny_prepared
    seq_len = manifest["tokens"]["seq_len"]

    def split_rows(split: str) -> tuple[list[str], list]:
        files = [str(run_dir / s["path"]) for s in manifest["shards"] if s["split"] == split]
        rows = [tuple(r) for f in files for r in pq.read_table(f).column("input_ids").to_pylist()]
        if len(rows) % 2 == 0:  # an odd number of rows: one more, in a file of its own
            extra = tmp_path / f"{split}-extra.parquet"
            pq.write_table(pa.Table.from_pylist([{"input_ids": list(rows[0])}], schema=pq.read_schema(files[0])), extra)
            files, rows = [*files, str(extra)], [*rows, rows[0]]
        return files, sorted(rows)

    datasets, expected = {}, {}
    for split in ("train", "val"):
        files, expected[split] = split_rows(split)
        n = len(expected[split])
        assert n % 2 == 1
        datasets[split] = read_parquet(split_files(files, n, 2, seq_len, tmp_path / "fillers", split))
    batch_size = next(b for b in range(24, 64) if (len(expected["train"]) // 2 + 1) % b)

    def worker(config):
        out = collect_rows(config)
        (Path(config["out"]) / f"rank{out['rank']}.json").write_text(json.dumps(out))

    trainer = TorchTrainer(worker, train_loop_config={"out": str(tmp_path), "batch_size": batch_size},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           datasets=datasets, dataset_config=ordered_data_config(),
                           run_config=ray.train.RunConfig(name="coverage", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(p["rows"] for p in per_rank), "each worker must get data"
    assert per_rank[0]["batch_sizes"] == per_rank[1]["batch_sizes"]  # the ranks step together
    assert per_rank[0]["batch_sizes"][-1] < batch_size  # a partial last batch, kept
    assert sum(p["fillers"] for p in per_rank) == 2  # one per epoch
    for epoch in range(2):
        seen = [tuple(r) for p in per_rank for e, r in p["rows"] if e == epoch]
        assert sorted(seen) == expected["train"], f"epoch {epoch}: rows missing or seen twice"
    orders = [[tuple(r) for e, r in per_rank[0]["rows"] if e == epoch] for epoch in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # reshuffled, same rows per rank
    val_seen = [tuple(r) for p in per_rank for r in p["val"]]
    assert sorted(val_seen) == expected["val"]  # every validation row once


def config(data_dir, out, **overrides) -> PretrainConfig:
    data = {
        "data": str(data_dir), "output_dir": str(out), "name": "t",
        "model": {"preset": "tiny", "max_seq_len": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 12, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "log_every": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return from_dict(PretrainConfig, data)


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["kind"] == "train"]


def test_pretrain_recovers_from_a_worker_death_and_exports(tiny_prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # sharded (FSDP): the replacement worker group restores the full weights and optimizer state
    # gathered from both shards; the rerun-after-an-error test below covers DDP, the default
    run_dir, manifest = tiny_prepared
    # the weights of the last 9 steps averaged (train.average_last): the mean, gathered from the
    # shards into the step-4 checkpoint, is sharded again by the replacement workers and continued
    cfg = config(run_dir, tmp_path, run={"max_failures": 2, "fail_at_step": 6}, scaling={"strategy": "fsdp"},
                 train={"average_last": 0.75})
    summary = run_pretrain(cfg)
    rows = {s: sum(sh["rows"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}
    assert summary["equal_shares"] == {s: {"rows": n, "per_worker": (n + 1) // 2, "filler_rows": n % 2}
                                       for s, n in rows.items()}
    out = Path(summary["run_dir"])
    assert (out / ".fault_injected").read_text() == "6"  # the worker really died at step 6
    steps = steps_logged(out)
    assert steps[-1] == 12 and summary["steps"] == 12
    # the replacement workers continued from the step-4 checkpoint: steps 5 and 6 were redone, not 1-4
    assert steps == list(range(1, 7)) + list(range(5, 13)), steps
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 0.5
    # steps 4..12 in the mean: 1 at step 4, then (the mean resumed, not restarted) 5 at 8, 9 at 12
    print("EVALS", [(e["step"], e.get("tail_average_steps")) for e in evals], steps_logged(out));     assert [(e["step"], e["tail_average_steps"]) for e in evals][-3:] == [(4, 1), (8, 5), (12, 9)]
    assert summary["exported"]["val_loss"] == summary["best_val_loss"]  # model/ is the best checkpoint
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    assert (Path(summary["model_dir"]) / "model.safetensors").exists() and tok.eos_token == "<|endoftext|>"
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert type(model).__name__ == "GPT2LMHeadModel"  # a plain, whole model
    saved = torch.load(next(out.rglob("training_state.pt")), weights_only=False)
    assert saved["optimizer_by_name"] is not None  # gathered from the shards, by parameter name
    again = run_pretrain(cfg)  # finished: not recomputed, and marked as such
    assert again.pop("cached") is True and again == summary


def test_interrupted_run_resumes_from_its_checkpoint(tiny_prepared, tmp_path):
    """DDP (the default), the masked objective with dropout: the rerun continues from the step-4
    checkpoint exactly as the interrupted run went on, the same rows, masks and every worker's
    own dropout masks (the losses of the redone steps are equal). The worker-death test above
    runs the causal objective under FSDP."""
    run_dir, _ = tiny_prepared
    crashing = config(run_dir, tmp_path, model={"objective": "masked", "dropout": 0.1},
                      run={"max_failures": 0, "fail_at_step": 6})
    with pytest.raises(Exception):
        run_pretrain(crashing)
    out = crashing.run_dir({"config_hash": json.loads((run_dir / "manifest.json").read_text())["config_hash"]})
    assert steps_logged(out)[-1] >= 6 and not (out / "summary.json").exists()
    summary = run_pretrain(crashing)  # same config, same run: continues from the step-4 checkpoint
    steps = steps_logged(out)
    assert summary["steps"] == 12 and steps[-1] == 12
    assert steps.count(1) == 1 and steps.count(5) == 2
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    first, rerun = records[:-8], records[-8:]  # steps 1..(the crash), then steps 5..12
    before = {r["step"]: r["loss"] for r in first}
    assert [r["step"] for r in rerun] == list(range(5, 13))
    assert [r["loss"] for r in rerun[:2]] == pytest.approx([before[5], before[6]], rel=1e-6, abs=1e-6)
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(summary["model_dir"])  # a plain, whole model
    assert summary["exported"]["val_loss"] == summary["best_val_loss"]
    assert type(model).__name__ == "BertForMaskedLM" and model.config.num_hidden_layers == 2
    assert records[-1]["loss"] < records[0]["loss"]
    import torch

    saved = torch.load(next(out.rglob("training_state.pt")), weights_only=False)
    assert saved["optimizer_by_name"] is None  # DDP saves rank 0's own optimizer state


def test_a_request_the_cluster_cannot_hold_is_refused_on_a_local_cluster(tiny_prepared, tmp_path, monkeypatch, caplog):
    """Ray would wait forever for GPUs (or CPUs) a local cluster does not have: the job started
    that cluster, so the request is refused with the shortfall named; on a joined cluster (which
    may autoscale) it is a warning."""
    from pipeline import ray_utils
    from pipeline.config import to_dict

    cfg = from_dict(PretrainConfig, {
        "data": str(tiny_prepared[0]), "output_dir": str(tmp_path / "out"), "model": {"preset": "tiny", "max_seq_len": 32},
        "train": {"max_steps": 2, "batch_size": 2}, "scaling": {"num_workers": 2, "use_gpu": True}})
    monkeypatch.setattr(ray_utils, "_LOCAL", True)
    with pytest.raises(ValueError, match=r"needs 2 GPU \(the cluster has 0\) and this local Ray cluster cannot grow"):
        run_pretrain(cfg)
    with pytest.raises(ValueError, match=r"needs 9 CPU \(the cluster has 2\)"):
        run_pretrain(from_dict(PretrainConfig, {**to_dict(cfg), "scaling": {"num_workers": 2, "cpus_per_worker": 4}}))
    from pipeline.train.pretrain import check_pretrain

    # fewer rows than one global batch: accepted (each step is a worker's whole share), and said
    with caplog.at_level(logging.INFO, logger="pipeline.train.pretrain"):
        check_pretrain(from_dict(PretrainConfig, {**to_dict(cfg), "train": {"batch_size": 100000}}))
    assert "fewer than train.batch_size (100000): every step trains on a worker's whole share" in caplog.text
    # a context longer than the data's rows: accepted, and said; shorter: refused by key
    check_pretrain(from_dict(PretrainConfig, {**to_dict(cfg), "model": {"preset": "tiny", "max_seq_len": 64}}))
    assert "model.max_seq_len (64) is longer than the data's rows (seq_len 32): positions from 32 on are never" in caplog.text
    with pytest.raises(ValueError, match=r"model.max_seq_len \(16\) is shorter than the data's seq_len \(32\)"):
        check_pretrain(from_dict(PretrainConfig, {**to_dict(cfg), "model": {"preset": "tiny", "max_seq_len": 16}}))
    monkeypatch.setattr(ray_utils, "_LOCAL", False)
    ray_utils.check_resources({"GPU": 2}, "a trial")
    assert "a trial needs 2 GPU (the cluster has 0): waiting for the cluster" in caplog.text


def test_resources_held_by_other_work_are_named_before_a_run_waits_for_them(caplog):
    """The cluster has the CPUs but another actor (a Serve replica, say) holds them: a run would
    wait for its Ray Data reads in silence; the check says what is free and why it waits."""
    import ray

    from pipeline import ray_utils

    @ray.remote
    class Holder:
        def ping(self):
            return 1

    # the actors of the tests before may still be giving their CPUs back: start from a quiet cluster
    free = ray.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    holder = Holder.options(num_cpus=free - 0.5).remote()  # leaves half a CPU
    try:
        ray.get(holder.ping.remote())
        with caplog.at_level(logging.WARNING, logger="pipeline.ray_utils"):
            ray_utils.check_resources({"CPU": 1.45}, "training (1 worker)")
        assert "training (1 worker) needs 1.45 CPU free to start; free now: 0.5 CPU" in caplog.text
        assert "Serve replicas" in caplog.text
        caplog.clear()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pipeline.ray_utils"):
            ray_utils.check_resources({"CPU": 1.45}, "a sweep's trial", warn_held=False)  # totals only, no wait
        assert not caplog.records and time.monotonic() - t0 < 1.0
    finally:
        ray.kill(holder)
    caplog.clear()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    ray_utils.check_resources({"CPU": free}, "training (1 worker)")
    assert "free to start" not in caplog.text

    # work that is ending (the sampling tasks of a Parquet read just set up, the actors of the
    # stage before) holds the CPUs for a moment: no warning, the check waits that moment out
    @ray.remote
    def brief():
        time.sleep(1.0)
        return 1

    pending = brief.options(num_cpus=free).remote()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) >= free and time.time() < deadline:
        time.sleep(0.02)  # until the task holds the CPUs
    with caplog.at_level(logging.WARNING, logger="pipeline.ray_utils"):
        ray_utils.check_resources({"CPU": free}, "training (1 worker)")
    assert "free to start" not in caplog.text
    ray.get(pending)


def test_parquet_reads_use_rays_v1_reader_unless_the_user_chooses(tiny_prepared, monkeypatch):
    """Ray 2.60's default Parquet reader starts a pool of footer-reading actors per read (32,
    whatever the number of files); ours reads with Ray's V1 reader (no pool), leaves the process's
    DataContext as it was, and reads every row. A user who picks the reader
    (RAY_DATA_USE_DATASOURCE_V2) gets V2 with one footer actor per batch of 10 files, and a user's
    own RAY_DATA_PARQUET_FOOTER_NUM_ACTORS wins."""
    import os

    from ray.data import DataContext

    from pipeline.ray_utils import read_parquet

    def source(ds):
        op = ds._logical_plan.dag
        while op.input_dependencies:
            op = op.input_dependencies[0]
        return op

    run_dir, manifest = tiny_prepared
    files = [str(run_dir / s["path"]) for s in manifest["shards"]]
    for key in ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "RAY_DATA_USE_DATASOURCE_V2"):
        monkeypatch.delenv(key, raising=False)
    before = DataContext.get_current().use_datasource_v2
    ds = read_parquet(files)
    assert type(source(ds).datasource).__name__ == "ParquetDatasource" and not hasattr(source(ds), "file_indexer")
    assert DataContext.get_current().use_datasource_v2 == before
    assert ds.count() == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert set(ds.take(1)[0]) == set(pq.read_schema(files[0]).names)
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    ds = read_parquet(files)
    assert source(ds).file_indexer._num_actors == -(-len(files) // 10)
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ
    assert ds.count() == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert source(read_parquet(files * (400 // len(files)))).file_indexer._num_actors == 32
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "5")
    assert source(read_parquet(files)).file_indexer._num_actors == 5


def test_a_parquet_read_returns_once_its_set_up_tasks_gave_their_cpus_back(tiny_prepared):
    """V1's sampling tasks (one CPU each) have returned when the read does, but the raylet gets
    their CPUs back a moment later; an execution or a resource check started in that moment saw a
    cluster without free CPUs (Ray Data then warns that the job "will hang")."""
    import ray

    from pipeline.ray_utils import read_parquet

    run_dir, manifest = tiny_prepared
    files = [str(run_dir / s["path"]) for s in manifest["shards"]]
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)  # a quiet cluster to start from
    held = []
    for _ in range(16):  # without the wait, one read in five to ten came back with CPUs still held
        time.sleep(0.2)
        read_parquet(files)
        held.append(total - ray.available_resources().get("CPU", 0))
    assert held == [0] * 16


def _base(tiny_prepared, path: Path, tokenizer_dir: Path | None = None, positions: int = 64, classifier: bool = False):
    """A GPT-NeoX LM (an architecture the pipeline does not build) saved with ``tokenizer_dir``
    (default: the tiny prepare output's tokenizer), as a model from elsewhere would come."""
    import transformers

    run_dir, manifest = tiny_prepared
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir or run_dir / "tokenizer"))
    config = transformers.GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=positions, num_labels=3)
    torch.manual_seed(3)
    cls = transformers.GPTNeoXForSequenceClassification if classifier else transformers.GPTNeoXForCausalLM
    cls(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_continued_pretraining_starts_from_the_base_and_checks_it(tiny_prepared, tmp_path):
    """``init_from``: training starts from the base's weights, whatever its architecture, and the
    export is that architecture; a base that cannot read the data is refused before any work,
    naming the key, and so is a model.* key (the architecture is the base's)."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.tokenizer import TokenizerConfig, train_tokenizer
    from pipeline.train.pretrain import check_pretrain

    run_dir, _ = tiny_prepared
    base = _base(tiny_prepared, tmp_path / "base")
    with pytest.raises(ValueError, match=r"model\.preset builds a new model, and init_from .*model=\{\}"):
        from_dict(PretrainConfig, {**to_plain(config(run_dir, tmp_path)), "init_from": str(base)})
    cfg = from_dict(PretrainConfig, {
        "data": str(run_dir), "output_dir": str(tmp_path / "out"), "name": "cont", "init_from": str(base),
        "optim": {"lr": 1e-12, "warmup_steps": 0}, "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2,
                                                             "eval_batches": 1, "log_every": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1}})
    with pytest.raises(ValueError, match=r"model\.n_layer builds a new model"):
        from_dict(PretrainConfig, {**to_plain(cfg), "model": {"n_layer": 3}})
    from_dict(PretrainConfig, {**to_plain(cfg), "model": {"dropout": 0.1}})  # the one model key it takes
    other = tmp_path / "other_tok"
    train_tokenizer(iter(["Zebras quietly juggle violet kites over the harbour."] * 50),
                    TokenizerConfig(vocab_size=300, min_frequency=1), other)
    for bad, match in ((tmp_path / "missing", "init_from: .*missing is not a Hugging Face model directory"),
                       (_base(tiny_prepared, tmp_path / "b2", tokenizer_dir=other), "init_from: .*another tokenizer"),
                       (_base(tiny_prepared, tmp_path / "b3", positions=16),
                        r"init_from: the data's rows \(seq_len 32\) are longer than .*context \(16\)"),
                       (_base(tiny_prepared, tmp_path / "b4", classifier=True), "init_from: .* is a sequence classifier")):
        with pytest.raises(ValueError, match=match):
            check_pretrain(from_dict(PretrainConfig, {**to_plain(cfg), "init_from": str(bad)}))
    # a masked LM from elsewhere continues on the masked objective, with the data's mask token
    import transformers

    from pipeline.train.pretrain import check_base, setup_lm

    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(str(tmp_path / "bert"))
    tok.save_pretrained(str(tmp_path / "bert"))
    bert_cfg = from_dict(PretrainConfig, {**to_plain(cfg), "init_from": str(tmp_path / "bert")})
    assert check_base(bert_cfg, run_dir, 32) == ((tmp_path / "bert").resolve(), "masked", "bert")
    model, batcher, _, _ = setup_lm({"model": to_plain(bert_cfg)["model"], "tokenizer_dir": str(run_dir / "tokenizer"),
                                     "loop": {"seed": 0}, "seq_len": 32, "init_from": str(tmp_path / "bert"),
                                     "objective": "masked"})
    assert type(model).__name__ == "BertForMaskedLM" and batcher.objective == "masked"
    assert batcher.mask_id == tok.mask_token_id is not None
    scratch = from_dict(PretrainConfig, {**to_plain(cfg), "init_from": None})
    hash_of = {"config_hash": json.loads((run_dir / "manifest.json").read_text())["config_hash"]}
    assert cfg.run_dir(hash_of) != scratch.run_dir(hash_of)  # a run of its own
    summary = run_pretrain(cfg)
    assert summary["steps"] == 2 and summary["arch"] == "gpt_neox" and summary["init_from"] == str(base)
    before = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert type(after).__name__ == "GPTNeoXForCausalLM"
    for name, value in after.state_dict().items():  # a learning rate of 1e-12: the base's own weights
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)


def to_plain(cfg) -> dict:
    from pipeline.config import to_dict

    return to_dict(cfg)
