"""Typed pipeline configuration, loaded from YAML with omegaconf dotlist overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class TaskConfig:
    name: str = "parity"  # parity, sudoku, or parquet (your own examples)
    n_bits: int = 8  # parity: bits per example
    targets: str = "running"  # parity: "running" (every position) or "final" (final parity only)
    size: int = 4  # sudoku: grid size (4 or 9)
    min_givens: int | None = None  # sudoku: stop removing cells at this many givens
    # parquet: Parquet files or folders (local or s3://) with input_ids and targets columns
    # (list of int, targets -100 where there is no loss) and optionally example_id.
    train_path: str | None = None
    test_path: str | None = None
    vocab_size: int | None = None  # parquet: token ids lie in [0, vocab_size)
    context_length: int | None = None  # parquet: maximum sequence length the model takes
    pad_id: int = 0  # parquet: token id used for padding (masked, carries no loss)
    n_train: int = 256
    n_test: int = 32
    seed: int = 0
    shard_size: int = 128  # examples per Parquet shard


@dataclass
class ModelConfig:
    # Your own model: `factory` and `loss` are import paths `package.module:attribute`, and
    # `body` is the attribute path of the looped module (see pipeline/models.py).
    factory: str = "operators.model:build_looped_gpt"
    body: str = "body"
    loss: str = "operators.model:per_example_loss"
    options: dict[str, Any] = field(default_factory=dict)  # extra keys for the factory
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    tau: int = 4
    mlp_ratio: int = 4
    bias: bool = True
    causal: bool = True


@dataclass
class TrainConfig:
    enabled: bool = True
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Training steps at which checkpoints are saved; empty means `num_checkpoints` evenly
    # spaced steps ending at `steps`.
    checkpoint_steps: list[int] = field(default_factory=list)
    num_checkpoints: int = 4
    seed: int = 0


@dataclass
class SketchConfig:
    method: str = "tensorsketch"  # tensorsketch, pooled (operators/projection.py) or exact
    dim: int = 2048  # buckets per parameter tensor (pooled: buckets shared by all tensors)
    seed: int = 0
    path: str = "auto"  # TensorSketch path: auto, fft or direct
    dtype: str = "float32"  # storage dtype: float32 or float16
    loss_reduction: str = "sum"  # per-example loss over target positions: sum or mean
    batch_size: int = 32
    autocast: str | None = None  # bfloat16 runs the forward under autocast
    step_matrix: bool = False  # train side keeps per-step rows; reduce writes step_matrix/


@dataclass
class ReduceConfig:
    topk: int = 10
    block_size: int = 4096  # train rows per matmul block
    eta: float | None = None  # one learning rate for every checkpoint instead of the stored ones


@dataclass
class ValidateConfig:
    """`sdi validate`: sketched against exact SDI on a sample of a run's examples."""

    n_train: int = 64  # train examples sampled (the first of each shard, in id order)
    n_test: int = 32
    methods: list[str] = field(default_factory=lambda: ["tensorsketch", "pooled"])
    dims: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    all_sketched: bool = True  # also run tensorsketch with every tensor sketched
    topk: int = 10
    reference: str = "auto"  # auto, true or false: compare with step-decomposed-influence
    batch_size: int = 32


@dataclass
class RayConfig:
    address: str | None = None  # None starts a local Ray instance (or joins RAY_ADDRESS)
    num_actors: int | None = None  # default: one per GPU, else one per `cpus_per_actor` CPUs
    cpus_per_actor: int = 1  # CPU threads per actor (torch.set_num_threads) without GPUs
    num_cpus: int | None = None  # CPUs of the local instance; None lets Ray detect them
    use_gpu: str = "auto"  # auto, true or false
    # Restarts of a sketch actor whose process dies; its unit is retried on the new process.
    actor_restarts: int = 3


@dataclass
class StorageConfig:
    # S3-compatible endpoint. Credentials are never configuration: they come from the
    # AWS_* environment variables, `profile` or the instance role (see README).
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None  # a named profile of ~/.aws/credentials
    anon: bool = False
    retries: int = 5  # attempts per storage call for transient errors
    retry_backoff: float = 0.5  # seconds before the first retry; doubles each attempt


@dataclass
class PipelineConfig:
    run_name: str = "demo"
    store: str = "./sdi-store"
    overwrite: bool = False  # write into a run whose configuration differs
    stages: list[str] = field(default_factory=lambda: ["prepare", "train", "sketch", "reduce"])
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


STAGES = ("prepare", "train", "sketch", "reduce")
# Keys left out of the configuration a run records and compares on re-runs: they change
# where or how the run executes, not its sketches. The reduce settings are absent too,
# because the reduce stage keys its own completion markers on a digest of its inputs
# (checkpoints, etas, top-k), so changing them recomputes only the scores.
EXECUTION_KEYS = (
    "store",
    "overwrite",
    "stages",
    "ray",
    "storage",
    "validate",
    "reduce",
    "sketch.batch_size",
    "sketch.path",
)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge the defaults, a YAML file and `key=value` overrides into a validated config."""
    merged = OmegaConf.structured(PipelineConfig)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(
                    f"config file {path} not found; pass a YAML file such as configs/demo.yaml"
                )
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration ({path or 'defaults'}): {error}") from error
    validate(merged)
    return merged


def validate(config: DictConfig) -> None:
    """Check values that the schema's types cannot express."""
    choices = {
        "task.name": ("parity", "sudoku", "parquet"),
        "sketch.method": ("tensorsketch", "pooled", "exact"),
        "sketch.path": ("auto", "fft", "direct"),
        "sketch.dtype": ("float32", "float16"),
        "sketch.loss_reduction": ("sum", "mean"),
        "ray.use_gpu": ("auto", "true", "false"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(config, key)
        if str(value) not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid; choose one of {allowed}")
    if config.task.name == "parquet" and not (config.task.train_path and config.task.test_path):
        raise ConfigError(
            "task.name=parquet needs task.train_path and task.test_path (Parquet files or "
            "folders with input_ids and targets columns)"
        )
    if config.task.name in ("parity", "sudoku", "parquet"):
        from operators.tasks import make_task

        try:
            make_task(config.task)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    if config.train.num_checkpoints < 1:
        raise ConfigError(
            f"train.num_checkpoints must be at least 1, got {config.train.num_checkpoints}"
        )
    for stage in config.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages contains {stage!r}; valid stages are {STAGES}")
    if not config.run_name or "/" in config.run_name:
        raise ConfigError(f"run_name={config.run_name!r} must be a non-empty name without '/'")
    positive = (
        "task.n_train",
        "task.n_test",
        "task.shard_size",
        "sketch.batch_size",
        "reduce.topk",
        "reduce.block_size",
        "ray.cpus_per_actor",
    )
    for key in positive:
        if OmegaConf.select(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {OmegaConf.select(config, key)}")
    if config.sketch.method != "exact" and config.sketch.dim < 2:
        raise ConfigError(f"sketch.dim must be at least 2, got {config.sketch.dim}")
    for key in ("model.factory", "model.loss"):
        module, colon, attribute = str(OmegaConf.select(config, key)).partition(":")
        if not (module and colon and attribute):
            raise ConfigError(
                f"{key}={OmegaConf.select(config, key)!r} is not an import path of the form "
                "'package.module:attribute'"
            )
    if not config.model.body or any(not part for part in config.model.body.split(".")):
        raise ConfigError(
            f"model.body={config.model.body!r} must be a dotted attribute path such as 'body'"
        )
    if config.model.tau < 1:
        raise ConfigError(f"model.tau must be at least 1, got {config.model.tau}")
    if config.sketch.autocast not in (None, "bfloat16", "float16"):
        raise ConfigError(
            f"sketch.autocast={config.sketch.autocast!r} is invalid; use null, bfloat16 or float16"
        )


def semantic_config(config: DictConfig) -> dict[str, Any]:
    """Return the part of the configuration that determines a run's results."""
    data = OmegaConf.to_container(config, resolve=True)
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        section = data
        for parent in parents:
            section = section.get(parent, {})
        section.pop(leaf, None)
    return data
