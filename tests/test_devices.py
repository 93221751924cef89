"""Device placement on CPU: resource options for fake GPU counts, worker devices, autocast."""

from __future__ import annotations

import logging
from dataclasses import asdict

import pyarrow as pa
import pytest
import torch

from operators.batching import collate
from operators.gradients import build_layout, sketch_batch
from operators.tasks import make_task
from pipeline.checkpoints import list_checkpoints, save_checkpoint
from pipeline.config import load_config
from pipeline.devices import PlacementError, plan_placement, use_gpus, worker_device
from pipeline.models import build_model, model_spec
from pipeline.prepare import run_prepare
from pipeline.runner import open_run
from pipeline.sketch_stage import SketchWorker, plan_units

TINY = [
    "task.n_bits=4",
    "task.n_train=6",
    "task.n_test=3",
    "task.shard_size=3",
    "model.d_model=16",
    "model.n_heads=2",
    "model.tau=3",
    "sketch.dim=64",
    "sketch.batch_size=4",
]


@pytest.mark.parametrize(
    ("setting", "gpus", "cpus", "num_actors", "cpus_per_actor", "expected"),
    [
        # One actor per GPU, each with num_gpus=1 and one CPU.
        ("auto", 4, 32, None, 2, (True, 4, {"num_gpus": 1, "num_cpus": 1}, 1)),
        # No GPUs: one actor per cpus_per_actor CPUs.
        ("auto", 0, 8, None, 2, (False, 4, {"num_gpus": 0, "num_cpus": 2}, 2)),
        ("auto", 0, 1, None, 4, (False, 1, {"num_gpus": 0, "num_cpus": 4}, 4)),
        ("false", 2, 8, None, 1, (False, 8, {"num_gpus": 0, "num_cpus": 1}, 1)),
        ("true", 2, 8, None, 1, (True, 2, {"num_gpus": 1, "num_cpus": 1}, 1)),
        ("auto", 4, 32, 2, 1, (True, 2, {"num_gpus": 1, "num_cpus": 1}, 1)),
        # An autoscaling cluster with no GPU worker yet: request the configured count.
        ("true", 0, 4, 3, 1, (True, 3, {"num_gpus": 1, "num_cpus": 1}, 1)),
    ],
)
def test_plan_placement(setting, gpus, cpus, num_actors, cpus_per_actor, expected) -> None:
    placement = plan_placement(setting, gpus, cpus, num_actors, cpus_per_actor)
    gpu, count, resources, threads = expected
    assert placement.gpu is gpu
    assert placement.count == count
    assert placement.resources == resources
    assert placement.threads == threads


def test_train_task_takes_one_gpu() -> None:
    assert plan_placement("auto", 2, 16, None, 4).task_resources() == {
        "num_gpus": 1,
        "num_cpus": 1,
    }
    assert plan_placement("auto", 0, 16, None, 4).task_resources() == {
        "num_gpus": 0,
        "num_cpus": 4,
    }


def test_gpu_true_without_gpus_or_actor_count() -> None:
    with pytest.raises(PlacementError, match="set ray.num_actors"):
        plan_placement("true", 0, 4, None, 1)
    with pytest.raises(PlacementError, match="'maybe' is invalid"):
        use_gpus("maybe", 1)


def test_more_gpu_actors_than_gpus_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.devices"):
        plan_placement("true", 1, 4, 3, 1)
    assert "requesting 3 one-GPU actors but the cluster has 1 GPUs" in caplog.text


def test_worker_device_cpu() -> None:
    assert worker_device(False) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_worker_device_gpu_without_cuda() -> None:
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        worker_device(True)


@pytest.mark.ray
def test_train_task_resources_on_ray(ray_session) -> None:
    from pipeline.executor import cluster_placement

    config = load_config("configs/demo.yaml", ["ray.cpus_per_actor=1"])
    placement = cluster_placement(config.ray)
    assert placement.gpu is False

    @ray_session.remote(**placement.task_resources())
    def assigned() -> dict:
        return ray_session.get_runtime_context().get_assigned_resources()

    resources = ray_session.get(assigned.remote(), timeout=60)
    assert resources.get("CPU") == 1
    assert "GPU" not in resources


@pytest.fixture()
def prepared_run(tmp_path):
    config = load_config("configs/demo.yaml", [f"store={tmp_path}", *TINY])
    run = open_run(config)
    shards = run_prepare(run, config)
    spec = model_spec(config)
    torch.manual_seed(0)
    save_checkpoint(run, build_model(spec), 1, 0.1, {}, spec)
    return config, run, shards


def test_sketch_worker_loads_model_on_its_device(prepared_run) -> None:
    config, run, shards = prepared_run
    worker = SketchWorker(run.store.spec(), _container(config), False, 1)
    unit = plan_units(run, list_checkpoints(run), shards)[0]
    result = worker.process(asdict(unit))
    assert result["examples"] == 3
    model = worker._loaded[1]
    assert {p.device for p in model.parameters()} == {worker.device}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_gpu_sketch_worker_without_cuda(prepared_run) -> None:
    config, run, _ = prepared_run
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        SketchWorker(run.store.spec(), _container(config), True, 1)


@pytest.mark.parametrize("autocast", ["bfloat16"])
def test_autocast_sketch_close_and_float32(prepared_run, autocast) -> None:
    config, run, shards = prepared_run
    spec = model_spec(config)
    torch.manual_seed(1)
    model = build_model(spec).eval()
    task = make_task(config.task)
    examples = [task.generate(10, seed=5)[i] for i in range(6)]
    batch = collate([e.input_ids for e in examples], [e.targets for e in examples], task.pad_id)
    layout = build_layout(model.body, "tensorsketch", 256, 0)

    exact = sketch_batch(model, model.body, 3, batch, layout, per_step=True)
    mixed = sketch_batch(
        model, model.body, 3, batch, layout, per_step=True, autocast_dtype=getattr(torch, autocast)
    )
    assert mixed.sketches.dtype == torch.float32
    error = (mixed.sketches - exact.sketches).norm() / exact.sketches.norm()
    assert error < 0.05
    assert error > 1e-4, "the forward pass did not run in reduced precision"
    torch.testing.assert_close(mixed.losses, exact.losses, rtol=0.05, atol=0.05)


def test_autocast_worker_stores_float32(prepared_run) -> None:
    config, run, shards = prepared_run
    container = _container(config)
    container["sketch"]["autocast"] = "bfloat16"
    worker = SketchWorker(run.store.spec(), container, False, 1)
    unit = [u for u in plan_units(run, list_checkpoints(run), shards) if u.split == "test"][0]
    worker.process(asdict(unit))
    table = run.store.read_table(unit.output)
    assert table.schema.field("sketch").type.value_type == pa.float32()
    assert table.num_rows == 3 * 3


def _container(config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)
