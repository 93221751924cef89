"""Where the stages run: a local Ray instance or an existing cluster, and a pool of sketch actors."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from omegaconf import DictConfig
from ray.util import ActorPool

from pipeline.devices import actor_resources, cluster_gpus, use_gpus
from pipeline.progress import progress

logger = logging.getLogger(__name__)


def start_ray(config: DictConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS), or start a local instance when neither is set."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    # Ship the project's code to workers of a remote cluster unless the job already did.
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        logger.info("starting a local Ray instance")
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, **kwargs)


class SketchPool:
    """A fixed set of sketch actors fed work units through ray.util.ActorPool."""

    def __init__(
        self, worker_class: type, store_spec: dict, config: dict, ray_config: DictConfig
    ) -> None:
        gpus = cluster_gpus(ray)
        self.gpu = use_gpus(str(ray_config.use_gpu).lower(), gpus)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if ray_config.num_actors:
            count = ray_config.num_actors
        elif self.gpu:
            count = gpus
        else:
            count = max(1, cpus // ray_config.cpus_per_actor)
        resources = actor_resources(self.gpu, ray_config.cpus_per_actor)
        threads = 1 if self.gpu else ray_config.cpus_per_actor
        # A unit is idempotent (fixed output key, one put, marker last), so when an actor's
        # process dies Ray restarts it and re-sends the unit it was working on.
        restarts = int(ray_config.get("actor_restarts", 3))
        remote_class = ray.remote(worker_class).options(
            **resources, max_restarts=restarts, max_task_retries=restarts
        )
        self.actors = [
            remote_class.remote(store_spec, config, self.gpu, threads) for _ in range(count)
        ]
        logger.info(
            "started %d sketch actors (%s, %s)", count, "GPU" if self.gpu else "CPU", resources
        )

    def map(self, items: list[Any]) -> list[Any]:
        """Run `process` on every item, returning results in completion order."""
        pool = ActorPool(self.actors)
        results = []
        finished = pool.map_unordered(lambda actor, item: actor.process.remote(item), items)
        for done, result in enumerate(progress(finished, "sketch", total=len(items)), 1):
            results.append(result)
            logger.info("sketch progress: %d/%d units (%s)", done, len(items), result["key"])
        return results

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
