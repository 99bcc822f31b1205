"""Helpers shared by the benchmarks: machine description and the results file format."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    first: dict[str, str] = {}  # each /proc/cpuinfo field of the first processor
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu, flags = first.get("model name") or platform.processor() or "cpu", set(first.get("flags", "").split())
    # Hosts that share a model name ("AMD EPYC") differ in vector width, which moves every CPU figure.
    widest = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    cpu = f"{cpu} ({widest})" if widest else cpu
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores {cpu}, {mem_gib:.0f} GiB RAM, no GPU" if not _has_gpu() else f"{cpu} + GPU"


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def write_result(name: str, metric: str, unit: str, ours: float, baseline: float, baseline_name: str, **extra) -> dict:
    result = {
        "metric": metric, "unit": unit, "ours": ours, "baseline": baseline, "baseline_name": baseline_name,
        "ratio": ours / baseline if baseline else None,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(), **extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table()
    return result


def write_table() -> None:
    """benchmarks/RESULTS.md: one row per results file."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        rows.append(f"| {path.stem} | {r['metric']} | {r['ours']:.4g} {r['unit']} | {r['baseline']:.4g} ({r['baseline_name']}) "
                    f"| {ratio} | {r['date']} | `{r['command']}` |")
    header = ("# Benchmark results\n\nLatest measured figures; each row comes from `benchmarks/results/<name>.json`, "
              "written by the script named in its command.\n\n"
              "| benchmark | metric | ours | baseline | ratio | date | command |\n|---|---|---|---|---|---|---|\n")
    (RESULTS.parent / "RESULTS.md").write_text(header + "\n".join(rows) + "\n")


def step_clock():
    """A transformers TrainerCallback that records the time at the end of every optimizer step."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, *_, **__):
            self.marks.append(time.perf_counter())

    return StepClock()
