"""Read access to a finished run: its tables, checkpoints, learning rates and example texts."""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline.analysis.decode import example_texts
from pipeline.checkpoints import list_checkpoints
from pipeline.reduce_stage import checkpoint_eta
from pipeline.run import Run
from pipeline.store import Store

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


class RunNotFoundError(FileNotFoundError):
    """The URL does not point at a run folder, or a table the query needs is missing."""


def split_run_url(url: str) -> tuple[str, str]:
    """Split `<store>/<run_name>` into the store URL and the run name."""
    trimmed = url.rstrip("/")
    if not trimmed or trimmed.endswith("://"):
        raise RunNotFoundError(f"run URL {url!r} is empty; pass <store>/<run_name>")
    if "/" not in trimmed.split("://", 1)[-1]:
        if "://" in trimmed:
            raise RunNotFoundError(
                f"run URL {url!r} names a bucket without a run; pass s3://bucket/<run_name>"
            )
        return ".", trimmed
    store, run_name = trimmed.rsplit("/", 1)
    return store, run_name


class RunResults:
    """The outputs of one run, read lazily from its store.

    Open one with `open_results("sdi-store/demo")`, or from a configuration with
    `RunResults(open_run(config))`.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        if not run.store.exists(run.rel("config.yaml")):
            raise RunNotFoundError(
                f"no run at {run.url()}: config.yaml not found; pass the run folder "
                "<store>/<run_name>, for example sdi-store/demo"
            )

    @property
    def url(self) -> str:
        return self.run.url()

    @cached_property
    def config(self) -> DictConfig:
        """The configuration recorded with the run."""
        return OmegaConf.create(self.run.store.read_bytes(self.run.rel("config.yaml")).decode())

    @cached_property
    def topk_depth(self) -> int:
        """Rows per (test, step, direction) in the stored `topk` table; 0 when unknown."""
        manifest = self.run.manifest("reduce")
        if not self.run.store.exists(manifest):
            return 0
        return int(self.run.store.read_json(manifest).get("topk", 0))

    @property
    def tau(self) -> int:
        return int(self.config.model.tau)

    def has_table(self, name: str) -> bool:
        return bool(self.run.store.list(self.run.rel(name), suffix=".parquet"))

    def read_table(
        self, name: str, columns: list[str] | None = None, filter: ds.Expression | None = None
    ) -> pa.Table:
        """Read a table of the run (`scores`, `tracin`, `topk`, `data/train`, ...) with pyarrow.

        `filter` is a pyarrow dataset expression, applied while reading so that a query
        for one test example does not hold the whole table in memory.
        """
        paths = self.run.store.list(self.run.rel(name), suffix=".parquet")
        if not paths:
            raise RunNotFoundError(
                f"run {self.url} has no {name}/ table; run the stage that writes it "
                f"(sdi run CONFIG stages=[...]) first"
            )
        store = self.run.store
        dataset = ds.dataset([store.path(p) for p in paths], filesystem=store.fs, format="parquet")
        return dataset.to_table(columns=columns, filter=filter)

    def read_frame(
        self, name: str, columns: list[str] | None = None, filter: ds.Expression | None = None
    ) -> pd.DataFrame:
        return self.read_table(name, columns, filter).to_pandas()

    @cached_property
    def checkpoints(self) -> pd.DataFrame:
        """One row per checkpoint: `checkpoint` (training step) and `eta` (its weight in TracIn).

        The etas are the ones the reduce stage recorded in its manifest (they include a
        `reduce.eta` override); without that manifest they come from the checkpoints.
        """
        manifest = self.run.manifest("reduce")
        if self.run.store.exists(manifest):
            record = self.run.store.read_json(manifest)
            return pd.DataFrame({"checkpoint": record["checkpoints"], "eta": record["etas"]})
        override = OmegaConf.select(self.config, "reduce.eta")
        infos = list_checkpoints(self.run)
        if not infos:
            raise RunNotFoundError(f"run {self.url} has no checkpoints")
        return pd.DataFrame(
            {
                "checkpoint": [info.step for info in infos],
                "eta": [checkpoint_eta(info, override) for info in infos],
            }
        )

    def select_checkpoints(self, checkpoints: list[int] | None) -> pd.DataFrame:
        """Return the rows of `checkpoints` for the given training steps (all when None)."""
        table = self.checkpoints
        if checkpoints is None:
            return table
        unknown = sorted(set(checkpoints) - set(table["checkpoint"]))
        if unknown:
            raise KeyError(
                f"checkpoints {unknown} are not in run {self.url}; "
                f"available: {table['checkpoint'].tolist()}"
            )
        return table[table["checkpoint"].isin(checkpoints)].reset_index(drop=True)

    @cached_property
    def texts(self) -> pd.Series:
        """The decoded text of every train and test example, indexed by example_id."""
        frames = []
        for split in SPLITS:
            table = self.read_table(f"data/{split}", ["example_id", "input_ids", "targets"])
            frames.append(example_texts(table, self.config.task))
        return pd.concat(frames)

    def text(self, example_ids: pd.Series) -> pd.Series:
        """Return the decoded text of each id in `example_ids` ("" for unknown ids)."""
        return example_ids.map(self.texts).fillna("")

    def test_ids(self) -> list[int]:
        table = self.read_table("data/test", ["example_id"])
        return sorted(table.column("example_id").to_pylist())

    def sketch_paths(self, checkpoint: int, split: str) -> list[str]:
        """Return the sketch files of one checkpoint and split, in shard order."""
        prefix = self.run.rel("sketches", f"checkpoint={checkpoint}", f"split={split}")
        paths = self.run.store.list(prefix, suffix=".parquet")
        if not paths:
            raise RunNotFoundError(
                f"run {self.url} has no {split} sketches for checkpoint {checkpoint} under "
                f"{self.run.store.display(prefix)}; run the sketch stage first"
            )
        return paths

    def count_rows(self, name: str) -> int:
        """Return the row count of a table from its Parquet footers, without reading the data."""
        total = 0
        for path in self.run.store.list(self.run.rel(name), suffix=".parquet"):
            with self.run.store.fs.open(self.run.store.path(path), "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def counts(self) -> dict[str, int]:
        """Return the sizes of the run: examples, checkpoints, sketch files and score rows."""
        store = self.run.store
        return {
            "train_examples": self.count_rows("data/train"),
            "test_examples": self.count_rows("data/test"),
            "checkpoints": len(store.list(self.run.rel("checkpoints"), suffix="/meta.json")),
            "sketch_units": len(store.list(self.run.rel("sketches"), suffix=".parquet")),
            "score_rows": self.count_rows("scores"),
            "tracin_rows": self.count_rows("tracin"),
        }


def open_results(url: str, storage: dict[str, Any] | None = None) -> RunResults:
    """Open the run at `<store>/<run_name>` (a local folder or s3://bucket/prefix/run).

    `storage` takes the same keys as the configuration's `storage` section
    (`endpoint_url`, `region`, `anon`); credentials come from the environment.
    """
    store_url, run_name = split_run_url(url)
    return RunResults(Run(Store(store_url, storage), run_name))


def run_counts(run: Run) -> dict[str, int]:
    """Return the sizes of a run for the CLI's closing summary (see `RunResults.counts`)."""
    return RunResults(run).counts()
