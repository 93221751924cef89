"""Query helpers, decoding and the HTML report on tiny runs, against hand computations."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from operators.hashing import HashedAxis, count_sketch
from operators.sketch import tensorsketch_direct
from operators.tasks.parity import ParityTask
from pipeline import cli, progress
from pipeline.analysis import (
    RunNotFoundError,
    RunResults,
    checkpoint_scores,
    open_results,
    peak_steps,
    self_influence,
    step_mass,
    top_influences,
    trajectory,
)
from pipeline.analysis.decode import example_texts, token_text
from pipeline.analysis.report import write_report
from pipeline.analysis.results import split_run_url
from pipeline.checkpoints import list_checkpoints, load_checkpoint
from pipeline.runner import open_run, run_pipeline
from pipeline.store import Store
from tests.oracle import unrolled_step_gradients
from tests.test_pipeline_e2e import as_long, tiny_config

pytestmark = pytest.mark.ray

TAU = 3
N_TRAIN, N_TEST = 10, 4
STORED_K = 3  # reduce.topk of the tiny configuration


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("analysis-store")


@pytest.fixture(scope="module")
def exact(store, ray_session) -> RunResults:
    config = tiny_config(store, "run_name=exact", "sketch.method=exact")
    run_pipeline(config)
    return RunResults(open_run(config))


@pytest.fixture(scope="module")
def sketched(store, ray_session) -> RunResults:
    config = tiny_config(store, "run_name=sketched", "sketch.dim=512")
    run_pipeline(config)
    return RunResults(open_run(config))


@pytest.fixture(scope="module")
def raw(exact) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_parquet(exact.run.url(name))
        for name in ("scores", "tracin", "data/train", "data/test")
    }


@pytest.fixture(scope="module")
def oracle(exact) -> dict:
    """Exact per-checkpoint gradients from the unrolled model: g_k(z) and phi_t,k(z')."""
    run = exact.run
    data = {split: pd.read_parquet(run.url("data", split)) for split in ("train", "test")}
    result = {}
    for info in list_checkpoints(run):
        model = load_checkpoint(run, info).double()
        train, test = {}, {}
        for row in data["train"].itertuples():
            steps = unrolled_step_gradients(model, as_long(row.input_ids), as_long(row.targets))
            train[row.example_id] = torch.cat(
                [sum(step[name] for step in steps).reshape(-1) for name in steps[0]]
            )
        for row in data["test"].itertuples():
            steps = unrolled_step_gradients(model, as_long(row.input_ids), as_long(row.targets))
            test[row.example_id] = [
                torch.cat([step[name].reshape(-1) for name in step]) for step in steps
            ]
        result[info.step] = {"eta": info.lr, "train": train, "test": test}
    return result


def numpy_top(frame: pd.DataFrame, k: int, direction: str) -> list[int]:
    """Rank train ids by score (proponents) or -score (opponents), ties by smaller id."""
    strength = frame["score"].to_numpy() * (1.0 if direction == "proponent" else -1.0)
    order = np.lexsort((frame["train_id"].to_numpy(), -strength))
    return frame["train_id"].to_numpy()[order][:k].tolist()


# Query helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, STORED_K, 6])  # 6 > stored topk: computed from scores
def test_top_influences_match_numpy(exact, raw, k) -> None:
    scores, tracin = raw["scores"], raw["tracin"]
    for test_id in raw["data/test"]["example_id"]:
        frame = top_influences(exact, int(test_id), k=k)
        assert set(frame["step"]) == set(range(TAU + 1))
        for step in range(TAU + 1):
            if step == 0:
                expected = tracin[tracin["test_id"] == test_id]
            else:
                expected = scores[(scores["test_id"] == test_id) & (scores["step"] == step)]
            for direction in ("proponent", "opponent"):
                rows = frame[(frame["step"] == step) & (frame["direction"] == direction)]
                assert rows["rank"].tolist() == list(range(1, min(k, N_TRAIN) + 1))
                assert rows["train_id"].tolist() == numpy_top(expected, k, direction)
                by_id = expected.set_index("train_id")["score"]
                np.testing.assert_allclose(rows["score"], by_id.loc[rows["train_id"]])


def test_top_influences_show_texts(exact, raw) -> None:
    test_id = int(raw["data/test"]["example_id"].iloc[0])
    frame = top_influences(exact, test_id, k=2, steps=[1], direction="proponent")
    task = ParityTask(n_bits=4, targets="running")
    train = raw["data/train"].set_index("example_id")
    test = raw["data/test"].set_index("example_id")
    for row in frame.itertuples():
        expected = task.decode(
            list(train.loc[row.train_id, "input_ids"]), list(train.loc[row.train_id, "targets"])
        )
        assert row.train_text == expected
    expected_test = task.decode(
        list(test.loc[test_id, "input_ids"]), list(test.loc[test_id, "targets"])
    )
    assert (frame["test_text"] == expected_test).all()
    assert set(frame["direction"]) == {"proponent"}
    assert set(frame["step"]) == {1}


def test_trajectory_matches_raw_scores(exact, raw) -> None:
    scores, tracin = raw["scores"], raw["tracin"]
    pairs = [(1_000_000, 3), (1_000_002, 7), (1_000_000, 3)]
    frame = trajectory(exact, pairs)
    assert len(frame) == 2 * TAU  # the repeated pair appears once
    for test_id, train_id in set(pairs):
        rows = frame[(frame["test_id"] == test_id) & (frame["train_id"] == train_id)]
        expected = scores[(scores["test_id"] == test_id) & (scores["train_id"] == train_id)]
        expected = expected.sort_values("step")
        assert rows["step"].tolist() == list(range(1, TAU + 1))
        np.testing.assert_allclose(rows["score"], expected["score"])
        np.testing.assert_allclose(rows["cumulative"], np.cumsum(expected["score"]))
        total = tracin[(tracin["test_id"] == test_id) & (tracin["train_id"] == train_id)]
        np.testing.assert_allclose(rows["cumulative"].iloc[-1], total["score"].iloc[0], rtol=1e-12)
        np.testing.assert_allclose(rows["tracin"], total["score"].iloc[0], rtol=1e-12)


@pytest.mark.parametrize("weight", ["abs", "positive"])
def test_peak_steps_match_numpy(exact, raw, weight) -> None:
    scores = raw["scores"]
    peaks = peak_steps(exact, weight=weight).set_index("test_id")
    mass = step_mass(exact, weight=weight)
    assert len(peaks) == N_TEST
    for test_id, group in scores.groupby("test_id"):
        matrix = np.zeros(TAU)
        for row in group.itertuples():
            value = abs(row.score) if weight == "abs" else max(row.score, 0.0)
            matrix[row.step - 1] += value
        assert peaks.loc[test_id, "peak_step"] == int(np.argmax(matrix)) + 1
        np.testing.assert_allclose(peaks.loc[test_id, "peak_share"], matrix.max() / matrix.sum())
        np.testing.assert_allclose(peaks.loc[test_id, "total_mass"], matrix.sum())
        rows = mass[mass["test_id"] == test_id]
        np.testing.assert_allclose(rows["mass"], matrix)


def test_step_mass_for_chosen_tests(exact) -> None:
    mass = step_mass(exact, test_ids=[1_000_001])
    assert set(mass["test_id"]) == {1_000_001}
    np.testing.assert_allclose(mass["share"].sum(), 1.0)


def test_self_influence_matches_oracle(exact, oracle) -> None:
    frame = self_influence(exact)
    expected = {
        train_id: sum(
            c["eta"] * float(c["train"][train_id] @ c["train"][train_id]) for c in oracle.values()
        )
        for train_id in range(N_TRAIN)
    }
    assert frame["train_id"].tolist() == sorted(expected, key=lambda i: (-expected[i], i))
    assert frame["rank"].tolist() == list(range(1, N_TRAIN + 1))
    computed = frame.set_index("train_id")["self_influence"]
    oracle_values = np.array([expected[i] for i in computed.index])
    np.testing.assert_allclose(computed.to_numpy(), oracle_values, rtol=1e-4)


def test_self_influence_by_checkpoint(exact, oracle) -> None:
    last = max(oracle)
    frame = self_influence(exact, checkpoints=[last], by_checkpoint=True)
    assert set(frame["checkpoint"]) == {last}
    for row in frame.itertuples():
        gradient = oracle[last]["train"][row.train_id]
        expected = oracle[last]["eta"] * float(gradient @ gradient)
        np.testing.assert_allclose(row.self_influence, expected, rtol=1e-4)


def test_self_influence_reads_train_sketches(sketched) -> None:
    """The helper equals sum_k eta_k ||row||^2 over the stored train sketch rows."""
    expected = np.zeros(N_TRAIN)
    for row in sketched.checkpoints.itertuples():
        for path in sketched.sketch_paths(row.checkpoint, "train"):
            table = pq.read_table(sketched.run.store.path(path))
            column = table.column("sketch").combine_chunks()
            values = column.flatten().to_numpy().reshape(-1, column.type.list_size)
            ids = table.column("example_id").to_numpy()
            expected[ids] += row.eta * (values.astype(np.float64) ** 2).sum(axis=1)
    frame = self_influence(sketched).set_index("train_id")
    np.testing.assert_allclose(frame["self_influence"].loc[range(N_TRAIN)], expected, rtol=1e-10)


def test_sketched_self_influence_near_exact(exact, sketched) -> None:
    exact_hashes = [info.content_hash for info in list_checkpoints(exact.run)]
    sketched_hashes = [info.content_hash for info in list_checkpoints(sketched.run)]
    assert exact_hashes == sketched_hashes  # same training, so the same gradients
    truth = self_influence(exact).set_index("train_id")["self_influence"].sort_index()
    estimate = self_influence(sketched).set_index("train_id")["self_influence"].sort_index()
    # At 512 buckets the relative error per tensor is about sqrt(2/512) = 6%, less in the
    # sum over tensors; this run's largest error is 2.3%.
    np.testing.assert_allclose(estimate, truth, rtol=0.1)
    assert estimate.idxmax() == truth.idxmax()


@pytest.mark.parametrize("kind", ["countsketch", "tensorsketch"])
def test_sketched_squared_norm_unbiased(kind) -> None:
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(1, 6, 24, generator=generator, dtype=torch.float64)
    d = torch.randn(1, 6, 20, generator=generator, dtype=torch.float64)
    vector = torch.randn(1, 300, generator=generator, dtype=torch.float64)
    if kind == "countsketch":
        exact = float((vector**2).sum())
    else:
        exact = float((torch.einsum("bto,bti->boi", d, a) ** 2).sum())
    ratios = []
    for seed in range(300):
        if kind == "countsketch":
            sketch = count_sketch(vector, HashedAxis(seed, "v", "vector", 300, 32))
        else:
            out_axis = HashedAxis(seed, "w", "out", 20, 32)
            in_axis = HashedAxis(seed, "w", "in", 24, 32)
            sketch = tensorsketch_direct(a, d, out_axis, in_axis)
        ratios.append(float((sketch[0] ** 2).sum()) / exact)
    ratios = np.array(ratios)
    standard_error = ratios.std() / np.sqrt(len(ratios))
    assert abs(ratios.mean() - 1.0) < 4 * standard_error
    assert ratios.std() > 0.1  # the estimate is noisy at 32 buckets, only its mean is exact


def test_checkpoint_scores_match_oracle(exact, oracle) -> None:
    test_ids = [1_000_001, 1_000_003]
    frame = checkpoint_scores(exact, test_ids, train_ids=[0, 4, 9])
    assert set(frame["checkpoint"]) == set(oracle)
    assert len(frame) == len(oracle) * 2 * 3 * TAU
    for row in frame.itertuples():
        record = oracle[row.checkpoint]
        phi = record["test"][row.test_id][row.step - 1]
        expected = record["eta"] * float(record["train"][row.train_id] @ phi)
        np.testing.assert_allclose(row.score, expected, rtol=1e-3, atol=1e-6 * abs(expected) + 1e-9)


def test_checkpoint_scores_sum_to_scores(sketched) -> None:
    frame = checkpoint_scores(sketched, [1_000_002])
    summed = frame.groupby(["test_id", "train_id", "step"])["score"].sum()
    scores = pd.read_parquet(sketched.run.url("scores"))
    stored = scores[scores["test_id"] == 1_000_002].set_index(["test_id", "train_id", "step"])
    np.testing.assert_allclose(summed.loc[stored.index], stored["score"], rtol=1e-5, atol=1e-8)


def test_checkpoint_filter(exact) -> None:
    first = int(exact.checkpoints["checkpoint"].iloc[0])
    frame = checkpoint_scores(exact, [1_000_000], checkpoints=[first])
    assert set(frame["checkpoint"]) == {first}
    assert len(frame) == N_TRAIN * TAU


# Bad inputs ----------------------------------------------------------------------------


def test_bad_queries_raise(exact) -> None:
    with pytest.raises(KeyError, match="test_id 5 is not a test example"):
        top_influences(exact, 5)
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_influences(exact, 1_000_000, k=0)
    with pytest.raises(ValueError, match=r"steps \[7\] are outside 0..3"):
        top_influences(exact, 1_000_000, steps=[7])
    with pytest.raises(ValueError, match="direction='sideways'"):
        top_influences(exact, 1_000_000, direction="sideways")
    with pytest.raises(KeyError, match=r"pairs \[\(1000000, 99\)\] have no scores"):
        trajectory(exact, [(1_000_000, 99)])
    with pytest.raises(ValueError, match="pairs is empty"):
        trajectory(exact, [])
    with pytest.raises(ValueError, match="weight='squared'"):
        peak_steps(exact, weight="squared")
    with pytest.raises(KeyError, match=r"checkpoints \[12345\] are not in run"):
        self_influence(exact, checkpoints=[12345])
    with pytest.raises(KeyError, match=r"test_ids \[42\] have no sketches"):
        checkpoint_scores(exact, [42])
    with pytest.raises(KeyError, match=r"train_ids \[999\] have no sketches"):
        checkpoint_scores(exact, [1_000_000], train_ids=[999])
    with pytest.raises(ValueError, match="test_ids is empty"):
        checkpoint_scores(exact, [])


def test_open_results_guards(tmp_path, exact) -> None:
    with pytest.raises(RunNotFoundError, match="config.yaml not found"):
        open_results(str(tmp_path / "missing"))
    assert split_run_url("sdi-store/demo/") == ("sdi-store", "demo")
    assert split_run_url("s3://bucket/prefix/demo") == ("s3://bucket/prefix", "demo")
    assert split_run_url("demo") == (".", "demo")
    with pytest.raises(RunNotFoundError, match="names a bucket without a run"):
        split_run_url("s3://bucket")
    opened = open_results(exact.run.url())
    with pytest.raises(RunNotFoundError, match="has no nothing/ table"):
        opened.read_table("nothing")


def test_unknown_task_falls_back_to_token_ids(exact) -> None:
    table = exact.read_table("data/train")
    texts = example_texts(table, {"name": "user-data"})
    first = table.slice(0, 1).to_pylist()[0]
    assert texts.loc[first["example_id"]] == token_text(first["input_ids"], first["targets"])
    assert token_text([1, 0, 2], [-100, -100, 1]) == "1 0 2 -> 1"


# Report and CLI ------------------------------------------------------------------------


class PageChecker(HTMLParser):
    """Collect tags, image sources and links, and check that elements nest and close."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src", ""))
        for key in ("href", "src"):
            if key in values and tag != "img":
                self.links.append(values[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


@pytest.fixture(scope="module")
def report(exact, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    path = Path(write_report(exact, folder / "report.html", count=2, k=3))
    return path


def test_report_html_well_formed(report) -> None:
    checker = PageChecker()
    checker.feed(report.read_text(encoding="utf-8"))
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    assert {"html", "head", "body", "table", "img", "h1"} <= checker.tags
    assert checker.links == []  # no stylesheets, scripts or links to fetch
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.html"]


def test_report_images_open(report) -> None:
    checker = PageChecker()
    checker.feed(report.read_text(encoding="utf-8"))
    # A histogram, then a trajectory plot and a heatmap per test example shown.
    assert len(checker.images) == 1 + 2 * 2
    for source in checker.images:
        assert source.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        image.verify()
        assert image.size[0] > 100
        assert image.size[1] > 100


def test_report_shows_texts_and_tests(report, exact) -> None:
    page = report.read_text(encoding="utf-8")
    peaks = peak_steps(exact)
    assert "Where influence concentrates" in page
    assert "Highest self-influence" in page
    shown = [int(t) for t in peaks["test_id"] if f"Test example {t}:" in page]
    assert len(shown) == 2
    for test_id in shown:
        assert str(exact.texts.loc[test_id]) in page


CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_screenshot_not_blank(report, tmp_path) -> None:
    screenshot = tmp_path / "page.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
        "--window-size=1000,1400",
        f"--screenshot={screenshot}",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, timeout=90, capture_output=True)
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1400, 1000)
    assert pixels.std() > 10  # a blank page is one colour
    assert (pixels < 128).mean() > 0.01  # text and plots draw dark pixels


def test_cli_report_writes_into_run(exact, capsys) -> None:
    assert cli.main(["--no-progress", "report", exact.run.url(), "--tests", "1", "--top", "2"]) == 0
    written = Path(exact.run.url("report.html"))
    assert written.is_file()
    assert f"Report: {written}" in capsys.readouterr().out


def test_cli_report_rejects_bad_run(tmp_path, exact, capsys) -> None:
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert cli.main(["report", exact.run.url(), "--test-id", "5"]) == 2
    assert "test ids [5] are not test examples" in capsys.readouterr().err
    assert cli.main(["report", exact.run.url(), "sketch.dim=3"]) == 2
    assert "need a configuration file" in capsys.readouterr().err


def test_cli_summary_counts(store, exact, capsys) -> None:
    """A re-run of a finished run skips every unit and prints the run's sizes."""
    config_args = [f"store={store}", "run_name=exact", "sketch.method=exact"]
    from tests.test_pipeline_e2e import TINY

    assert cli.main(["--no-progress", "run", "configs/demo.yaml", *TINY, *config_args]) == 0
    out = capsys.readouterr().out
    assert (
        f"counts: {N_TRAIN} train and {N_TEST} test examples, 2 checkpoints, 8 sketch units, "
        f"{N_TRAIN * N_TEST * TAU} score rows"
    ) in out


def test_progress_switch(monkeypatch, ray_session) -> None:
    monkeypatch.setenv("SDI_PROGRESS", "0")
    progress.set_enabled(None)
    assert not progress.enabled()
    assert list(progress.progress(iter([1, 2, 3]), "items")) == [1, 2, 3]
    progress.set_enabled(True)
    try:
        assert progress.enabled()
        assert list(progress.progress([4, 5], "items")) == [4, 5]
        futures = [ray_session.put(value) for value in (7, 8, 9)]
        assert progress.gather(ray_session, futures, "values") == [7, 8, 9]
    finally:
        progress.set_enabled(None)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1 for one test, stopped at its end."""
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto server on {endpoint} did not start within 10 s")
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_report_from_s3_store(exact, s3_endpoint) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="analysis")
    local = exact.run.store
    remote = Store("s3://analysis/runs", {"endpoint_url": s3_endpoint})
    for path in local.list(exact.run.name):
        if "/checkpoints/" not in path and "/sketches/" not in path:
            remote.write_bytes(path, local.read_bytes(path))

    results = open_results("s3://analysis/runs/exact", {"endpoint_url": s3_endpoint})
    expected = top_influences(exact, 1_000_000, k=2)
    pd.testing.assert_frame_equal(top_influences(results, 1_000_000, k=2), expected)
    written = write_report(results, count=1, k=2)
    assert written == "s3://analysis/runs/exact/report.html"
    page = remote.read_bytes("exact/report.html").decode()
    assert page.startswith("<!DOCTYPE html>")
    # The sketches stayed behind, so the page explains why it has no self-influence table.
    assert "Not available: run s3://analysis/runs/exact has no train sketches" in page
