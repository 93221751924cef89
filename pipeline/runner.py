"""Run the stages of one configuration in order: prepare, train, sketch, reduce."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.executor import SketchPool, cluster_placement, start_ray
from pipeline.prepare import run_prepare
from pipeline.reduce_stage import run_reduce
from pipeline.run import Run
from pipeline.sketch_stage import SketchWorker, run_sketch
from pipeline.store import Store
from pipeline.train import train_model

logger = logging.getLogger(__name__)


def open_run(config: DictConfig) -> Run:
    store = Store(config.store, config.storage)
    return Run(store, config.run_name)


def _train_remote(store_spec: dict, config: dict, shards: dict, gpu: bool) -> dict:
    from pipeline.devices import worker_device

    config = OmegaConf.create(config)
    run = Run(Store.from_spec(store_spec), config.run_name)
    return train_model(run, config, shards, worker_device(gpu))


def run_pipeline(config: DictConfig) -> dict[str, Any]:
    """Run the configured stages; each skips the work a previous run already finished."""
    run = open_run(config)
    run.claim(config)
    summary: dict[str, Any] = {"run": run.url(), "timings": {}}
    container = OmegaConf.to_container(config, resolve=True)
    start_ray(config)

    stages = list(config.stages)
    started = time.perf_counter()
    shards = run_prepare(run, config)
    summary["timings"]["prepare"] = time.perf_counter() - started

    if "train" in stages and config.train.enabled:
        started = time.perf_counter()
        if run.store.exists(run.manifest("train")):
            logger.info("run %s: train already complete, skipping", run.name)
            summary["train"] = run.store.read_json(run.rel("train", "metrics.json"))
        else:
            placement = cluster_placement(config.ray)
            remote = ray.remote(**placement.task_resources())(_train_remote)
            summary["train"] = ray.get(
                remote.remote(run.store.spec(), container, shards, placement.gpu)
            )
        summary["timings"]["train"] = time.perf_counter() - started

    if "sketch" in stages:
        started = time.perf_counter()
        pool = SketchPool(SketchWorker, run.store.spec(), container, config.ray)
        try:
            summary["sketch"] = run_sketch(run, config, shards, pool)
        finally:
            pool.shutdown()
        summary["timings"]["sketch"] = time.perf_counter() - started

    if "reduce" in stages:
        started = time.perf_counter()
        summary["reduce"] = run_reduce(run, config, shards, ray)
        summary["timings"]["reduce"] = time.perf_counter() - started
    return summary


def torch_threads_for_driver() -> None:
    """Keep the driver from oversubscribing cores that Ray workers use."""
    torch.set_num_threads(1)
