"""Ray Tune over the real pretraining function: >= 4 trials, ASHA stops some early, and the best
configuration comes back as a YAML that the pretrain job accepts unchanged."""

import json
import time

import pytest
import yaml

from jobs import pretrain
from pipeline.config import from_dict
from pipeline.tune.sweep import SearchSpace, TuneConfig, run_tune, trial_overrides

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(420)]


def test_trial_overrides():
    assert trial_overrides({"lr": 0.001, "batch_size": 4, "unrelated": 1}) == ["train.batch_size=4", "optim.lr=0.001"]
    with pytest.raises(ValueError, match="space.lr"):
        SearchSpace(lr=[0.1, 0.01])
    with pytest.raises(ValueError, match="metric must be one of"):
        from_dict(TuneConfig, {"base": "x.yaml", "metric": "val_f1"})
    with pytest.raises(ValueError, match=r"grace_period must be in \[1, evaluations per trial = 4\], got 0"):
        from_dict(TuneConfig, {"base": "x.yaml", "max_steps": 40, "grace_period": 0})
    with pytest.raises(ValueError, match=r"grace_period must be in \[1, evaluations per trial = 4\], got 5"):
        from_dict(TuneConfig, {"base": "x.yaml", "max_steps": 40, "grace_period": 5})
    with pytest.raises(ValueError, match="max_concurrent must be >= 1"):
        from_dict(TuneConfig, {"base": "x.yaml", "max_concurrent": 0})
    from pipeline.tune.sweep import check_tune

    with pytest.raises(ValueError, match="pretraining reports val_loss only"):
        check_tune(from_dict(TuneConfig, {"base": "jobs/configs/pretrain_demo.yaml", "metric": "val_accuracy"}))


def test_a_given_space_sweeps_only_what_it_names_and_every_choice_is_checked_first(tiny_prepared, tmp_path):
    """Keys a user's ``space`` leaves out keep the base config's values (the default space applies
    only without a ``space`` section); a choice no trial could train with is refused by name
    before the sweep starts."""
    from pipeline.tune.sweep import check_tune

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": str(tiny_prepared[0]), "model": {"preset": "tiny", "max_seq_len": 32}}))
    assert from_dict(TuneConfig, {"base": str(base), "space": {"lr": [1e-4, 1e-3]}}).space.swept() == ["lr"]
    assert from_dict(TuneConfig, {"base": str(base)}).space.swept() == ["lr", "batch_size", "weight_decay", "warmup_steps"]
    with pytest.raises(ValueError, match="space: name at least one"):
        from_dict(TuneConfig, {"base": str(base), "space": {}})
    with pytest.raises(ValueError, match=r"space: the trial \{'n_layer': 1, 'n_embd': 99\} would fail: model.n_embd"):
        check_tune(from_dict(TuneConfig, {"base": str(base), "space": {"n_layer": [1, 2], "n_embd": [64, 99]}}))
    with pytest.raises(ValueError, match=r"space: the trial \{'batch_size': 0\} would fail: train.batch_size"):
        check_tune(from_dict(TuneConfig, {"base": str(base), "space": {"batch_size": [8, 0]}}))
    with pytest.raises(ValueError, match=r"space: the trial \{'n_layer': 0\} would fail: model.n_layer"):
        check_tune(from_dict(TuneConfig, {"base": str(base), "space": {"n_layer": [0]}}))
    check_tune(from_dict(TuneConfig, {"base": str(base), "space": {"n_layer": [1, 2], "n_embd": [64, 96]}}))
    # continued pretraining (init_from, given relative to where the job runs): the trials, which run in
    # their own working directories, get its absolute path; a depth or width sweep is refused by name
    import os

    from pipeline.model.build import ModelConfig, build_model
    from pipeline.tune.sweep import trial_base
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_prepared[0] / "tokenizer"))
    build_model(ModelConfig(preset="tiny", max_seq_len=32), len(tok)).save_pretrained(str(tmp_path / "base_model"))
    tok.save_pretrained(str(tmp_path / "base_model"))
    cont = tmp_path / "cont.yaml"
    cont.write_text(yaml.safe_dump({"data": str(tiny_prepared[0]), "init_from": "base_model"}))
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        sweep = from_dict(TuneConfig, {"base": str(cont), "space": {"lr": [1e-4, 1e-3]}})
        check_tune(sweep)
        assert trial_base(sweep, yaml.safe_load(cont.read_text()), tmp_path)[0]["init_from"] == str(tmp_path / "base_model")
        with pytest.raises(ValueError, match=r"space: the trial \{'n_layer': 1\} would fail: model.n_layer builds a new"):
            check_tune(from_dict(TuneConfig, {"base": str(cont), "space": {"n_layer": [1]}}))
    finally:
        os.chdir(here)
    manifest = json.loads((tiny_prepared[0] / "manifest.json").read_text())
    (tmp_path / "noval").mkdir()
    (tmp_path / "noval" / "manifest.json").write_text(json.dumps(
        {**manifest, "shards": [sh for sh in manifest["shards"] if sh["split"] != "val"]}))
    with pytest.raises(ValueError, match="tune ranks trials by validation loss: .*noval has no val shards"):
        check_tune(from_dict(TuneConfig, {"base": str(base), "overrides": [f"data={tmp_path / 'noval'}"]}))
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), "scaling": {"num_workers": 1, "use_gpu": True}}))
    with pytest.raises(ValueError, match="tune: a trial needs 1 GPUs .*; the cluster has 0"):
        run_tune(from_dict(TuneConfig, {"base": str(gpu), "output_dir": str(tmp_path / "t"), "space": {"lr": [1e-4, 1e-3]}}))
    # the pretrain and finetune jobs' 2 workers x 0.5 CPU leave no CPU for a trial's reads on 2 CPUs:
    # refused with both ways out (the base config, or the sweep's own overrides)
    wide = tmp_path / "wide.yaml"
    wide.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}}))
    with pytest.raises(ValueError, match=r"cannot hold a trial .* or in the sweep's own overrides"):
        run_tune(from_dict(TuneConfig, {"base": str(wide), "output_dir": str(tmp_path / "t"), "space": {"lr": [1e-4, 1e-3]}}))


def test_tune_runs_trials_and_asha_stops_some(tiny_prepared, tmp_path):
    run_dir, _ = tiny_prepared
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": str(run_dir), "output_dir": str(tmp_path / "unused"), "name": "p",
        "model": {"preset": "tiny", "max_seq_len": 32},
        "train": {"batch_size": 4, "eval_batches": 2, "log_every": 1},
        # one worker per trial: two trials at a time on the 2 test CPUs (two workers per trial is
        # what the classification sweep test and the demo run)
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.45, "threads_per_worker": 1},
    }))
    cfg = from_dict(TuneConfig, {"base": str(base), "output_dir": str(tmp_path / "tune"), "num_samples": 4,
                                 "max_steps": 8, "eval_every": 2, "seed": 1,
                                 "space": {"lr": [1e-6, 5e-3], "batch_size": [4], "weight_decay": [0.0],
                                           "warmup_steps": [1]}})
    summary = run_tune(cfg)
    assert summary["num_trials"] == 4 and not any(t["error"] for t in summary["trials"])
    assert summary["stopped_early"] >= 1, summary["trials"]
    assert summary["concurrency"] == 2
    best = yaml.safe_load(open(summary["best_config"]))
    assert best["optim"]["lr"] == pytest.approx(summary["best"]["lr"])
    cfg2 = pretrain.parse_config(["--config", summary["best_config"]])  # accepted unchanged
    assert cfg2.optim.lr == pytest.approx(summary["best"]["lr"])
    out = json.loads(open(f"{summary['output_dir']}/summary.json").read())
    assert out["best"]["val_loss"] == min(t["val_loss"] for t in out["trials"] if t["val_loss"] is not None)


def test_the_groups_of_a_stopped_trials_dead_controller_are_released(monkeypatch):
    """A stopped trial's Train controller may create a new placement group for a replacement
    worker just before it dies (its worker died first); no one else removes that group on a
    cluster without the dashboard, and the next training run waited forever for its CPUs. The
    sweep's callback removes every group of an ended trial's controller once it is dead, and
    leaves a live controller's groups alone. A group request the controller sent just before it
    died can reach the GCS after that (seen in CI): such a late group is removed too."""
    from types import SimpleNamespace

    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

    from pipeline.tune import sweep

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for Ray Train's: it creates its workers' groups
        def group(self) -> str:
            pg = placement_group([{"CPU": 0.1}])
            ray.get(pg.ready())
            return pg.id.hex()

    def state(pg_hex: str) -> str:
        return placement_group_table(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))["state"]

    controller = Controller.remote()
    workers_group = ray.get(controller.group.remote())
    callback, trial = sweep.release_train_placement_groups_callback(), SimpleNamespace(trial_id="t1")
    callback.interval_s = 0
    callback.on_trial_result(1, [], trial, {"placement_group_id": workers_group})
    retry_group = ray.get(controller.group.remote())  # a replacement worker group, never reported
    callback.on_trial_complete(1, [], trial)
    callback.on_step_begin(2, [])
    assert state(workers_group) == state(retry_group) == "CREATED"  # its controller is alive
    ray.kill(controller)
    deadline = time.time() + 30
    while callback.ended and time.time() < deadline:  # until the GCS has the controller dead
        callback.on_step_begin(3, [])
        time.sleep(0.2)
    assert state(workers_group) == state(retry_group) == "REMOVED"
    # the late group: the GCS table shows it created by the dead controller (a stand-in group here)
    late = placement_group([{"CPU": 0.1}])
    ray.get(late.ready())
    real, dead_controller = sweep._live_groups, callback.controllers["t1"]
    monkeypatch.setattr(sweep, "_live_groups", lambda: {**real(), late.id.hex(): dead_controller}
                        if state(late.id.hex()) != "REMOVED" else real())
    callback.on_experiment_end([])
    assert state(late.id.hex()) == "REMOVED"


def test_a_trial_checks_the_clusters_totals_but_not_what_its_sibling_trials_hold(tiny_prepared, tmp_path, monkeypatch):
    """A sweep runs trials side by side on purpose (it sized their concurrency to the cluster), so
    a trial does not warn that other work holds CPUs; a pretrain job outside a sweep does."""
    from pipeline import ray_utils
    from pipeline.train.pretrain import PretrainConfig, run_pretrain
    from pipeline.tune.sweep import run_trial

    class Checked(Exception):
        pass

    calls = []

    def record(needed, what, settle_s=3.0, warn_held=True):
        calls.append((needed, warn_held))
        raise Checked  # stop before the TorchTrainer starts

    monkeypatch.setattr(ray_utils, "check_resources", record)
    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", lambda: None)  # no Tune session here
    base = {"data": str(tiny_prepared[0]), "output_dir": str(tmp_path / "out"), "model": {"preset": "tiny", "max_seq_len": 32},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.45}}
    with pytest.raises(Checked):
        run_trial({"base": base, "sample": {"lr": 1e-3}})
    with pytest.raises(Checked):
        run_pretrain(from_dict(PretrainConfig, base))
    assert calls == [({"CPU": 1.45}, False), ({"CPU": 1.45}, True)]
