"""Helpers shared by the benchmark scripts: the demo corpora as plain texts, timing medians."""

from __future__ import annotations

import os
import platform
import statistics
import time

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}.items():
    os.environ.setdefault(key, value)


def demo_texts() -> list[dict]:
    """The parsed documents of bbc-news + chatterbot (what the prepare stage reads)."""
    from pipeline.data.sources import SourceConfig, expand_source, read_file

    out = []
    for name in ("bbc-news", "chatterbot"):
        for task in expand_source(SourceConfig(path=name)):
            out.extend(r for r in read_file(task, 1_000_000) if r.get("text"))
    return out


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name and its bf16 matrix instructions (this project's machines differ in
    both, and bf16 training speed with them)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(bf16) or 'no bf16 instructions'})"


def machine() -> str:
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def cpu_breakdown(seconds: float, match: str = "RayTrainWorker", delay: float = 20.0) -> dict:
    """Where the machine's CPU goes (Linux): wait until two processes named ``match`` are busy,
    then ``delay`` s more (start-up over), then sample for ``seconds``: the whole machine's split
    (/proc/stat, in % of one core), every process's share (psutil; processes that start and exit
    inside the window are only in the machine figure) and, for the busiest thread of each matching
    process, its on-CPU and run-queue-wait shares (/proc/.../schedstat: runnable but waiting for a
    core)."""
    import psutil

    def matching():
        return [p for p in psutil.process_iter(["cmdline"]) if match in " ".join(p.info["cmdline"] or [])]

    def cpu(p) -> float:  # 0 for a process that has exited
        try:
            return p.cpu_percent(None)
        except psutil.Error:
            return 0.0

    while True:
        procs = matching()
        for p in procs:
            cpu(p)
        time.sleep(1.0)
        if sum(1 for p in procs if cpu(p) > 50) >= 2:
            break
    time.sleep(delay)

    def machine_ticks():
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]

    def schedstat(p):
        out = {}
        for t in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{t}/schedstat") as f:
                out[t] = [int(v) for v in f.read().split()[:2]]
        return out

    everyone = [(p, (" ".join(p.info["cmdline"] or []) or p.info["name"] or "?")[:70])
                for p in psutil.process_iter(["cmdline", "name"])]
    for p, _ in everyone:
        cpu(p)
    workers = matching()
    m0, s0, t0 = machine_ticks(), {p.pid: schedstat(p) for p in workers}, time.perf_counter()
    time.sleep(seconds)
    m1, s1, dt = machine_ticks(), {p.pid: schedstat(p) for p in workers}, time.perf_counter() - t0
    ticks = [b - a for a, b in zip(m0, m1)]
    cores = 100.0 * (os.cpu_count() or 1) / max(1, sum(ticks))
    split = dict(zip(["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"],
                     (round(v * cores, 1) for v in ticks)))
    shares = []
    for p, name in everyone:
        try:
            shares.append((round(p.cpu_percent(None), 1), p.pid, name))
        except psutil.Error:
            continue
    threads = []
    for pid, before in s0.items():
        after = s1.get(pid, {})
        busiest = max(before, key=lambda t: after.get(t, before[t])[0] - before[t][0])
        on, wait = (after[busiest][i] - before[busiest][i] for i in (0, 1))
        threads.append({"pid": pid, "on_cpu_pct": round(on / 1e7 / dt, 1), "runqueue_wait_pct": round(wait / 1e7 / dt, 1)})
    shares.sort(reverse=True)
    return {"seconds": round(dt, 1), "machine_pct_of_one_core": split, "processes": shares,
            "workers": threads}
