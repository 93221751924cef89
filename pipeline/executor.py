"""Execution of the stages on a local Ray instance or an existing cluster, with a pool of sketch actors."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from omegaconf import DictConfig
from ray.util import ActorPool

from pipeline.devices import Placement, plan_placement
from pipeline.progress import progress

logger = logging.getLogger(__name__)


def start_ray(config: DictConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS), or start a local instance when neither is set."""
    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    # NOTE: nothing is shipped here. Inside a job from `sdi submit` the workers inherit the
    # job's runtime environment (the uploaded code); a driver that joins a cluster directly
    # needs the project, and any model module it names, installed on every node.
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        logger.info("starting a local Ray instance")
        ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, **kwargs)


def cluster_placement(ray_config: DictConfig) -> Placement:
    """Plan the workers for the connected cluster's current GPUs and CPUs."""
    resources = ray.cluster_resources()
    return plan_placement(
        str(ray_config.use_gpu).lower(),
        int(resources.get("GPU", 0)),
        int(resources.get("CPU", 1)),
        ray_config.num_actors,
        ray_config.cpus_per_actor,
    )


class SketchPool:
    """A fixed set of sketch actors fed work units through ray.util.ActorPool.

    Actors start on the first `map` call with work, so a re-run with nothing pending
    starts none.
    """

    def __init__(
        self, worker_class: type, store_spec: dict, config: dict, ray_config: DictConfig
    ) -> None:
        self.worker_class = worker_class
        self.store_spec = store_spec
        self.config = config
        self.ray_config = ray_config
        self.actors: list[Any] = []

    def _start(self) -> None:
        placement = cluster_placement(self.ray_config)
        self.gpu = placement.gpu
        # A unit is idempotent (fixed output key, one put, marker last), so when an actor's
        # process dies Ray restarts it and re-sends the unit it was working on.
        restarts = int(self.ray_config.get("actor_restarts", 3))
        remote_class = ray.remote(self.worker_class).options(
            **placement.resources, max_restarts=restarts, max_task_retries=restarts
        )
        self.actors = [
            remote_class.remote(self.store_spec, self.config, placement.gpu, placement.threads)
            for _ in range(placement.count)
        ]
        logger.info(
            "started %d sketch actors (%s, %s)",
            placement.count,
            "GPU" if placement.gpu else "CPU",
            placement.resources,
        )

    def map(self, items: list[Any]) -> list[Any]:
        """Run `process` on every item, returning results in completion order.

        When a unit fails, the units already handed to other actors are waited for before
        the error is raised, so none of them writes its output after the stage has ended.
        """
        if not items:
            return []
        if not self.actors:
            self._start()
        pool = ActorPool(self.actors)
        results = []
        finished = pool.map_unordered(lambda actor, item: actor.process.remote(item), items)
        try:
            for done, result in enumerate(progress(finished, "sketch", total=len(items)), 1):
                results.append(result)
                logger.info("sketch progress: %d/%d units (%s)", done, len(items), result["key"])
        except Exception:
            while pool.has_next():
                try:
                    pool.get_next_unordered()
                except Exception as other:  # already failing; log and keep draining
                    logger.warning("sketch unit also failed while stopping: %s", other)
            raise
        return results

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
