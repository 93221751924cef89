"""Shared pieces of the benchmarks: the model and batches, paired timing, peak memory."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from operators.batching import Batch
from operators.model import LoopedGPT, LoopedGPTConfig


@dataclass(frozen=True)
class Shape:
    """The model and batch of one measurement (by default tau 8, batch 32, 18 tokens, 2048 buckets)."""

    width: int = 64
    tau: int = 8
    batch: int = 32
    seq: int = 18
    dim: int = 2048
    heads: int = 4
    layers: int = 1
    vocab: int = 4

    def label(self) -> dict:
        return dict(self.__dict__)


def make_model(shape: Shape, seed: int = 0) -> LoopedGPT:
    """Return a looped GPT of the shape, with non-trivial weights (float32, CPU)."""
    torch.manual_seed(seed)
    config = LoopedGPTConfig(
        vocab_size=shape.vocab,
        context_length=shape.seq,
        d_model=shape.width,
        n_heads=shape.heads,
        n_layers=shape.layers,
        tau=shape.tau,
    )
    return LoopedGPT(config)


def make_batch(shape: Shape, seed: int = 1) -> Batch:
    """Return a full batch of random tokens with a target at every position."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator)
    targets = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator)
    return Batch(ids, targets, torch.ones(shape.batch, shape.seq, dtype=torch.bool))


def paired_timings(
    methods: dict[str, Callable[[], object]], repeats: int, baseline: str, warmup: int = 1
) -> dict[str, dict]:
    """Time every method once per round, rounds interleaved, and compare with `baseline`.

    On a shared machine the load changes between rounds; the ratio of two methods timed
    in the same round cancels most of that, so the headline is the median of per-round
    ratios. Medians of the seconds themselves are reported too.
    """
    for _ in range(warmup):
        for function in methods.values():
            function()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, function in methods.items():
            started = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - started)
    result = {}
    for name, values in seconds.items():
        ratios = [value / base for value, base in zip(values, seconds[baseline], strict=True)]
        result[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "ratio_to_" + baseline: statistics.median(ratios),
            "repeats": repeats,
        }
    return result


def peak_rss_delta(module: str, args: list[str], timeout: float = 600) -> dict:
    """Run `python -m module args` in a fresh process and return the JSON it prints.

    The child measures its own peak resident memory (Linux VmHWM) minus its resident
    memory just before the measured call, so nothing left over from other measurements
    hides or inflates the peak.
    """
    env = dict(os.environ)
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def rss_kib(field: str) -> int:
    """Return a memory field (VmRSS, VmHWM) of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status; peak memory needs Linux")


def machine() -> dict:
    """Return the machine and software versions that the numbers belong to."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        wanted = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in wanted:
                info["lscpu " + key.strip()] = value.strip()
        flags = [line for line in lscpu.splitlines() if line.startswith("Flags")]
        if flags:
            info["avx512"] = "avx512f" in flags[0]
    except OSError:
        info["lscpu"] = "unavailable"
    for name in ("numpy", "pyarrow", "ray"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import importlib.metadata as metadata

        info["step-decomposed-influence"] = metadata.version("step-decomposed-influence")
    except Exception:
        info["step-decomposed-influence"] = None
    with open("/proc/loadavg") as load:
        info["loadavg_at_start"] = load.read().split()[:3]
    return info
