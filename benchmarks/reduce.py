"""Reduce stage: the blocked product against torch.matmul, Parquet reading, end to end."""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import Shape, make_model
from operators.gradients import build_layout
from pipeline import fingerprint as fp
from pipeline.reduce_stage import (
    SketchMatrix,
    accumulate_products,
    prefetched_sketches,
    read_sketches,
    reduce_train_shard,
)
from pipeline.run import Run
from pipeline.sketch_stage import sketch_table
from pipeline.store import Store


def measure_reduce(
    n_train: int, n_test: int, tau: int, checkpoints: int, dtype: str, repeats: int
) -> dict:
    """Write `checkpoints` train shards and test sketches, then time the reduce pieces."""
    shape = Shape(width=64, tau=tau)
    model = make_model(shape)
    layout = build_layout(model.body, "tensorsketch", shape.dim, seed=0)
    dim = layout.total_dim
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sdi-bench-reduce-") as root:
        store = Store(root)
        run = Run(store, "bench")
        train_paths, tests = [], []
        for k in range(checkpoints):
            fingerprint = fp.sketch_fingerprint(
                layout, model.config.to_dict(), f"hash{k}", "sum", dtype, tau
            )
            train = torch.randn(n_train, 1, dim, generator=generator)
            table = sketch_table(
                list(range(n_train)),
                train,
                torch.zeros(n_train),
                torch.ones(n_train, dtype=torch.bool),
                False,
                dtype,
                fingerprint,
            )
            path = run.sketch_file(k, "train", 0)
            store.write_table(path, table)
            train_paths.append(path)
            test_values = torch.randn(n_test * tau, dim, generator=generator).numpy()
            tests.append(
                SketchMatrix(
                    np.repeat(np.arange(10**6, 10**6 + n_test), tau),
                    np.tile(np.arange(1, tau + 1), n_test),
                    test_values,
                    fingerprint,
                    f"test{k}",
                )
            )
        file_bytes = sum(len(store.read_bytes(path)) for path in train_paths)
        flops = 2.0 * n_train * n_test * tau * dim * checkpoints
        matrices = [read_sketches(store, [path]).values for path in train_paths]

        def matmul() -> None:
            for train, test in zip(matrices, tests, strict=True):
                torch.from_numpy(train) @ torch.from_numpy(test.values).T

        def kernel() -> None:
            total = torch.zeros(n_train, n_test * tau, dtype=torch.float64)
            for train, test in zip(matrices, tests, strict=True):
                accumulate_products(total, train, test.values, 1.0, 4096)

        def read_and_kernel() -> None:
            total = torch.zeros(n_train, n_test * tau, dtype=torch.float64)
            # The reduce task's own loop: the next file is read while this one multiplies.
            trains = prefetched_sketches(store, train_paths)
            for train, test in zip(trains, tests, strict=True):
                accumulate_products(total, train.values, test.values, 1.0, 4096)

        def read() -> None:
            for path in train_paths:
                read_sketches(store, [path])

        def end_to_end() -> None:
            reduce_train_shard(
                store.spec(),
                "bench",
                0,
                train_paths,
                [1.0] * checkpoints,
                10,
                4096,
                "benchmark",
                *tests,
            )

        timings: dict[str, list[float]] = {}
        functions = {
            "matmul": matmul,
            "kernel": kernel,
            "read": read,
            "read_and_kernel": read_and_kernel,
            "end_to_end": end_to_end,
        }
        for function in functions.values():
            function()
        for _ in range(repeats):
            for name, function in functions.items():
                started = time.perf_counter()
                function()
                timings.setdefault(name, []).append(time.perf_counter() - started)

    result = {
        "n_train": n_train,
        "n_test": n_test,
        "tau": tau,
        "checkpoints": checkpoints,
        "dim": dim,
        "dtype": dtype,
        "parquet_mib": file_bytes / 2**20,
    }
    for name, values in timings.items():
        median = statistics.median(values)
        result[name + "_s"] = median
        if name != "read":
            result[name + "_gflops"] = flops / median / 1e9
            ratios = [m / v for m, v in zip(timings["matmul"], values, strict=True)]
            result[name + "_vs_matmul"] = statistics.median(ratios)
    result["read_mib_per_s"] = file_bytes / 2**20 / result["read_s"]
    return result
