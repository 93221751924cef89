"""Device and Ray resource choices for actors and tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The requested GPU placement cannot be satisfied by the cluster."""


@dataclass(frozen=True)
class Placement:
    """Placement of the pipeline's Ray workers: `count` sketch actors with `resources` each."""

    gpu: bool
    count: int
    resources: dict[str, Any]
    threads: int  # torch threads inside each worker

    def task_resources(self) -> dict[str, Any]:
        """Return the Ray options of a single task (the train stage) under this placement."""
        return dict(self.resources)


def cluster_gpus(ray_module: Any) -> int:
    """Return the number of GPUs the connected Ray cluster offers."""
    return int(ray_module.cluster_resources().get("GPU", 0))


def use_gpus(setting: str, gpus_available: int, requested_actors: int | None = None) -> bool:
    """Decide whether workers take GPUs: `auto` uses them when the cluster has any.

    `true` also works on a cluster whose GPU workers are added on demand (an autoscaling
    KubeRay cluster reports no GPUs until a task requests one) as long as the number of
    actors is given, because that number is what gets requested.
    """
    if setting == "true":
        if gpus_available == 0 and not requested_actors:
            raise PlacementError(
                "ray.use_gpu=true but the Ray cluster has no GPUs now; set ray.num_actors to "
                "the number of one-GPU actors to request (an autoscaling cluster then adds GPU "
                "workers), or set ray.use_gpu=auto to run on CPUs"
            )
        return True
    if setting == "false":
        return False
    if setting != "auto":
        raise PlacementError(f"ray.use_gpu={setting!r} is invalid; use auto, true or false")
    return gpus_available > 0


def actor_resources(gpu: bool, cpus_per_actor: int) -> dict[str, Any]:
    """Ray options of one worker: one GPU each, or a fixed number of CPU threads."""
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": cpus_per_actor}


def plan_placement(
    setting: str,
    gpus_available: int,
    cpus_available: int,
    num_actors: int | None,
    cpus_per_actor: int,
) -> Placement:
    """Choose GPU or CPU workers and how many sketch actors to start.

    With GPUs: one actor per GPU (`num_gpus=1`), or `num_actors` of them. Without: one
    actor per `cpus_per_actor` CPUs, or `num_actors` of them.
    """
    gpu = use_gpus(setting, gpus_available, num_actors)
    if num_actors:
        count = num_actors
    elif gpu:
        count = gpus_available
    else:
        count = max(1, cpus_available // cpus_per_actor)
    if gpu and count > gpus_available:
        logger.warning(
            "requesting %d one-GPU actors but the cluster has %d GPUs now; the extra actors "
            "wait until an autoscaler adds GPU workers or a GPU becomes free",
            count,
            gpus_available,
        )
    threads = 1 if gpu else cpus_per_actor
    return Placement(gpu, count, actor_resources(gpu, cpus_per_actor), threads)


def worker_device(gpu: bool) -> torch.device:
    """Return the torch device inside a worker that Ray gave `num_gpus=1` (or none)."""
    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "this Ray worker was scheduled with a GPU but torch.cuda.is_available() is "
                "False; install a CUDA build of torch on the cluster's GPU nodes"
            )
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so it is always cuda:0 here.
        return torch.device("cuda", 0)
    return torch.device("cpu")
