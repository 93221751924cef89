"""Your own model: a factory, body path and loss named in the configuration, nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from operators.capture import CaptureError
from operators.model import LoopedGPT, LoopedGPTConfig, build_looped_gpt, per_example_loss
from pipeline.checkpoints import list_checkpoints, load_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.models import (
    ModelSpecError,
    build_model,
    model_spec,
    resolve_body,
    resolve_loss,
)
from pipeline.runner import open_run, run_pipeline
from tests.oracle import unrolled_body_gradients, unrolled_step_gradients
from tests.user_model import RecurrentTagger, masked_cross_entropy

USER_CONFIG = "tests/user_model.yaml"


def as_long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, ray_session):
    store = tmp_path_factory.mktemp("user-store")
    config = load_config(USER_CONFIG, [f"store={store}"])
    summary = run_pipeline(config)
    return config, summary


@pytest.mark.ray
def test_user_checkpoints_record_factory(user_run) -> None:
    config, _ = user_run
    run = open_run(config)
    infos = list_checkpoints(run)
    assert [info.step for info in infos] == [10, 20]
    meta = run.store.read_json(f"{infos[0].path}/meta.json")
    assert meta["model"]["factory"] == "tests.user_model:build_recurrent_tagger"
    assert meta["model"]["body"] == "core.cell"
    assert meta["model_config"]["hidden"] == 20
    model = load_checkpoint(run, infos[0])
    assert isinstance(model, RecurrentTagger)
    assert model.core.cell.update.out_features == 20


@pytest.mark.ray
def test_user_exact_scores_match_oracle(user_run) -> None:
    config, _ = user_run
    run = open_run(config)
    data = {split: pd.read_parquet(run.url("data", split)) for split in ("train", "test")}
    expected: dict[tuple[int, int, int], float] = {}
    for info in list_checkpoints(run):
        model = load_checkpoint(run, info).double()

        def step_grads(row, model=model):
            return unrolled_body_gradients(
                model,
                "core.cell",
                3,
                as_long(row.input_ids),
                as_long(row.targets),
                masked_cross_entropy,
            )

        train_grads = {}
        for row in data["train"].itertuples():
            steps = step_grads(row)
            train_grads[row.example_id] = torch.cat(
                [sum(step[name] for step in steps).reshape(-1) for name in steps[0]]
            )
        for row in data["test"].itertuples():
            for t, step in enumerate(step_grads(row), 1):
                phi = torch.cat([step[name].reshape(-1) for name in step])
                for train_id, grad in train_grads.items():
                    key = (row.example_id, train_id, t)
                    expected[key] = expected.get(key, 0.0) + info.lr * float(grad @ phi)

    scores = pd.read_parquet(run.url("scores")).set_index(["test_id", "train_id", "step"])
    keys = list(expected)
    oracle = np.array([expected[key] for key in keys])
    computed = scores["score"].loc[keys].to_numpy()
    assert len(scores) == 4 * 10 * 3
    assert np.abs(oracle).max() > 0
    np.testing.assert_allclose(computed, oracle, rtol=1e-4, atol=1e-5 * np.abs(oracle).max())


@pytest.mark.ray
def test_user_tracin_is_sum_of_steps(user_run) -> None:
    config, _ = user_run
    run = open_run(config)
    scores = pd.read_parquet(run.url("scores"))
    tracin = pd.read_parquet(run.url("tracin")).set_index(["test_id", "train_id"])["score"]
    summed = scores.groupby(["test_id", "train_id"])["score"].sum()
    np.testing.assert_allclose(tracin.loc[summed.index], summed, rtol=1e-10)


def test_generic_oracle_matches_looped_gpt_oracle() -> None:
    torch.manual_seed(0)
    model = LoopedGPT(LoopedGPTConfig(vocab_size=4, context_length=6, d_model=8, n_heads=2, tau=3))
    model = model.double()
    ids, targets = as_long([1, 2, 0, 3, 1]), as_long([-100, 2, 0, 3, -100])
    generic = unrolled_body_gradients(model, "body", 3, ids, targets, per_example_loss)
    reference = unrolled_step_gradients(model, ids, targets)
    for got, want in zip(generic, reference, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name])


def test_builtin_model_uses_the_factory_interface() -> None:
    config = load_config("configs/demo.yaml", ["model.d_model=16", "model.n_heads=2"])
    spec = model_spec(config)
    assert spec.factory == "operators.model:build_looped_gpt"
    model = build_model(spec)
    assert isinstance(model, LoopedGPT)
    assert model.config.d_model == 16
    assert model.config.vocab_size == spec.config["vocab_size"]
    assert resolve_body(model, spec.body) is model.body
    assert resolve_loss(spec.loss) is per_example_loss


def test_builtin_factory_rejects_unknown_options() -> None:
    config = load_config("configs/demo.yaml", ["model.options.hidden=3"])
    with pytest.raises(ValueError, match=r"\['hidden'\] are not LoopedGPT settings"):
        build_model(model_spec(config))
    with pytest.raises(ValueError, match="not LoopedGPT settings"):
        build_looped_gpt({"vocab_size": 4, "width": 3})


def test_user_model_spec_from_config() -> None:
    spec = model_spec(load_config(USER_CONFIG))
    assert spec.body == "core.cell"
    assert spec.tau == 3
    assert spec.config["hidden"] == 20
    assert spec.config["d_model"] == 12
    model = build_model(spec)
    assert isinstance(model, RecurrentTagger)
    assert resolve_body(model, "core.cell") is model.core.cell


def test_options_must_not_repeat_model_keys() -> None:
    config = load_config(USER_CONFIG, ["model.options.tau=5"])
    with pytest.raises(ModelSpecError, match=r"model.options sets \['tau'\]"):
        model_spec(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.factory=tests.user_model", "not an import path"),
        ("model.loss=masked_cross_entropy", "not an import path"),
        ("model.body=core..cell", "dotted attribute path"),
        ("model.tau=0", "model.tau must be at least 1"),
    ],
)
def test_model_keys_validated(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(USER_CONFIG, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.factory=tests.no_such_module:build", "cannot be imported"),
        ("model.factory=tests.user_model:no_such_factory", "has no attribute 'no_such_factory'"),
        ("model.factory=tests.user_model:IGNORE_INDEX", "not a callable"),
    ],
)
def test_bad_factory_errors(override, message) -> None:
    spec = model_spec(load_config(USER_CONFIG, [override]))
    with pytest.raises((ModelSpecError, TypeError), match=message):
        build_model(spec)


def test_factory_must_return_module() -> None:
    spec = model_spec(load_config(USER_CONFIG, ["model.factory=builtins:dict"]))
    with pytest.raises(ModelSpecError, match="returned dict; it must return a torch.nn.Module"):
        build_model(spec)


def test_bad_body_path_errors() -> None:
    model = build_model(model_spec(load_config(USER_CONFIG)))
    with pytest.raises(ModelSpecError, match="no attribute path 'core.body'"):
        resolve_body(model, "core.body")
    with pytest.raises(ModelSpecError, match="is a int, not a torch.nn.Module"):
        resolve_body(model, "tau")


def test_body_outside_linear_layernorm_rejected(tmp_path) -> None:
    from pipeline.run import Run
    from pipeline.store import Store
    from pipeline.train import train_model

    # The embedding is not a Linear or LayerNorm, so its gradient cannot be captured.
    config = load_config(USER_CONFIG, [f"store={tmp_path}", "model.body=embed"])
    run = Run(Store(str(tmp_path), config.storage), config.run_name)
    with pytest.raises(
        CaptureError, match=r"body parameters \[.weight.\] are not held by an nn.Linear"
    ):
        train_model(run, config, {"train": [], "test": []}, torch.device("cpu"))
