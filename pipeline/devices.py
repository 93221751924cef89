"""Device and Ray resource choices for actors and tasks."""

from __future__ import annotations

from typing import Any

import torch


def cluster_gpus(ray_module: Any) -> int:
    """Return the number of GPUs the connected Ray cluster offers."""
    return int(ray_module.cluster_resources().get("GPU", 0))


def use_gpus(setting: str, gpus_available: int) -> bool:
    """Decide whether actors take GPUs: `auto` uses them when the cluster has any."""
    if setting == "true":
        if gpus_available == 0:
            raise RuntimeError(
                "ray.use_gpu=true but the Ray cluster has no GPUs; set ray.use_gpu=auto"
            )
        return True
    if setting == "false":
        return False
    return gpus_available > 0


def actor_resources(gpu: bool, cpus_per_actor: int) -> dict[str, Any]:
    """Ray options of one worker: one GPU each, or a fixed number of CPU threads."""
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": cpus_per_actor}


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
