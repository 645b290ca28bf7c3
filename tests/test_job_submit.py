"""`ray job submit` against a real head node: started on 127.0.0.1 with its own temp dir and token
authentication on, and stopped alone afterwards (never `ray stop`, which stops every cluster)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # a test cluster: what has not exited by then is killed
    for p in alive:
        p.kill()


@pytest.fixture()
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    dash = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--num-cpus=2",
           # every fixed default port gets a free one: the tests' own local cluster holds the defaults
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 60
        while time.time() < deadline:  # the dashboard answers (401 without a token) once it is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(1)
        yield address, env, token_path.read_text()
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(400)
def test_ray_job_submit_prepare(head_node, tmp_path):
    address, env, token = head_node
    # token authentication is on: the dashboard refuses a request without the token
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code == 401

    corpus = tmp_path / "corpus.jsonl"
    text = "The {0} report of the city council and the plans to build a new {0} station with the money."
    corpus.write_text("\n".join(json.dumps({"text": text.format(w)}) for w in ["north", "south", "east", "west"] * 3) + "\n")
    out = tmp_path / "out"
    submit = [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={REPO}", "--",
              "python", "-m", "jobs.prepare", "--config", "jobs/configs/prepare_demo.yaml",
              "--input", str(corpus), "--output", str(out), "tokenizer.vocab_size=300"]
    for _ in range(20):  # the dashboard's job agent registers a few seconds after `ray start` returns
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=360, cwd=tmp_path)
        log = proc.stdout + proc.stderr
        if "No available agent" not in log:
            break
        time.sleep(2)
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    manifests = list(out.glob("*/manifest.json"))
    assert len(manifests) == 1, log[-4000:]
    counts = json.loads(manifests[0].read_text())["counts"]
    assert counts["input_docs"] == 12 and counts["dropped"]["exact_duplicate"] == 8


def test_cluster_yaml_is_a_valid_launcher_config_with_token_auth():
    """``cluster.yaml`` passes the cluster launcher's own schema (what ``ray up`` checks first), and
    every node starts Ray in token mode with the token copied to it: without a token, ``ray start``
    in Ray 2.60 starts a cluster with no authentication."""
    import jsonschema
    import ray
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "cluster.yaml").read_text())
    jsonschema.validate(cfg, json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))
    assert any(remote.endswith("/.ray/auth_token") for remote in cfg["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if " start " in c]
        assert start and all("RAY_AUTH_MODE=token" in c and ".venv/bin/ray" in c for c in start), key
