"""Scaling: one against two actors, and cost against examples, tau, width and sketch dim."""

from __future__ import annotations

import time

import torch

from benchmarks.common import Shape
from benchmarks.methods import stage


class StageActor:
    """A Ray actor that sketches the same batch `count` times with one torch thread."""

    def __init__(self, shape: dict) -> None:
        torch.set_num_threads(1)
        self.run = stage(Shape(**shape))
        self.run()

    def work(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            self.run()
        return time.perf_counter() - started


def actors(shape: Shape, batches: int) -> dict:
    """Throughput of 1 and 2 actors (1 CPU each) sketching `batches` batches in total."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        remote = ray.remote(num_cpus=1)(StageActor)
        result = {}
        for count in (1, 2):
            pool = [remote.remote(shape.label()) for _ in range(count)]
            ray.get([actor.work.remote(0) for actor in pool])
            started = time.perf_counter()
            ray.get([actor.work.remote(batches // count) for actor in pool])
            seconds = time.perf_counter() - started
            examples = 2 * shape.batch * (batches // count) * count
            result[f"{count}_actors_examples_per_s"] = examples / seconds
            for actor in pool:
                ray.kill(actor)
        result["speedup"] = result["2_actors_examples_per_s"] / result["1_actors_examples_per_s"]
        return result
    finally:
        if started_ray:
            ray.shutdown()


def sweep(base: Shape, field: str, values: list[int], repeats: int) -> list[dict]:
    """Median seconds per batch (both sides) of the sketch stage as one field varies."""
    rows = []
    for value in values:
        shape = Shape(**{**base.label(), field: value})
        run = stage(shape)
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        times.sort()
        seconds = times[len(times) // 2]
        rows.append(
            {
                field: value,
                "seconds_per_batch": seconds,
                "examples_per_s": 2 * shape.batch / seconds,
            }
        )
    return rows
