"""``backtest``: agreement with backtesting.py run directly, model signals without look-ahead,
bad configs refused by name, and a model_signal backtest of a trained model through the queue."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest, Strategy
from backtesting.lib import crossover
from backtesting.test import GOOG, SMA
from mlflow.tracking import MlflowClient

from services.gpu_worker.context import TaskContext
from services.gpu_worker.tasks import backtest, model_signals, train_model
from services.gpu_worker.tasks.ohlcv import build_features, load_ohlcv
from shared.backtest_config import BacktestConfig
from shared.client import DistributedClient
from shared.constants import ROUTE_CPU, ROUTE_GPU
from shared.errors import TaskConfigError
from shared.messages import TaskState
from shared.settings import Settings
from shared.storage import Manifest, ManifestEntry, file_digest, open_storage
from shared.task_types import TrainModelConfig, route_of, validate_config
from tests.conftest import Platform, service_env, tradectl

#: A model that trains in about a second on GOOG (the pipeline, not the model, is under test).
TINY_MODEL = {"feature_window": 8, "hidden_size": 16, "epochs": 2, "device": "cpu"}
WAIT_S = 180


def make_context(root: Path, task_id: str, tracking_uri: str) -> TaskContext:
    """A task's context laid out as the worker lays it: ``<root>/<task id>/artifacts``."""
    artifact_dir = root / task_id / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return TaskContext(
        task_id=task_id,
        attempt=1,
        artifact_dir=artifact_dir,
        checkpoint_path=root / task_id / "checkpoints" / "last.pt",
        tracking_uri=tracking_uri,
    )


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def trained(tasks_root: Path, tracking_uri: str) -> str:
    """Id of a finished tiny ``train_model`` task in ``tasks_root``."""
    config = TrainModelConfig.model_validate(TINY_MODEL)
    train_model.run(config, make_context(tasks_root, "model-1", tracking_uri))
    return "model-1"


class DirectSmaCross(Strategy):
    """backtesting.py's README example, written here independently of the task's code."""

    n1 = 10
    n2 = 20

    def init(self):
        self.sma1 = self.I(SMA, self.data.Close, self.n1)
        self.sma2 = self.I(SMA, self.data.Close, self.n2)

    def next(self):
        if crossover(self.sma1, self.sma2):
            self.position.close()
            self.buy()
        elif crossover(self.sma2, self.sma1):
            self.position.close()
            self.sell()


# --- configs and routing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"strategy": "foo"}, "strategy"),
        ({"fast_window": 20, "slow_window": 20}, "slow_window"),
        ({"fast_window": 50, "slow_window": 20}, "slow_window"),
        ({"commission": 1.0}, "commission"),
        ({"commission": -0.001}, "commission"),
        ({"spread": 0.5}, "spread"),
        ({"strategy": "model_signal"}, "model_task"),
        ({"strategy": "model_signal", "model_task": "../etc"}, "model_task"),
        ({"start": "2010-01-01", "end": "2009-01-01"}, "end"),
        ({"dataset": "prices.xlsx"}, "dataset"),
        ({"comission": 0.001}, "comission"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(TaskConfigError) as caught:
        validate_config("backtest", config)
    assert f"invalid backtest config: {field}: " in str(caught.value)


async def test_bad_config_is_refused_at_submit_and_nothing_queued(
    client: DistributedClient,
) -> None:
    with pytest.raises(TaskConfigError, match=r"model_task: .*required by strategy model_signal"):
        await client.submit("backtest", {"strategy": "model_signal"})
    with pytest.raises(TaskConfigError, match="strategy: Input should be 'sma_crossover' or"):
        await client.submit("backtest", {"strategy": "foo"})
    assert await client.list_tasks() == []


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("strategy=foo", "strategy: Input should be"), ("commission=1.5", "commission: Input")],
)
def test_cli_refuses_a_bad_backtest_naming_the_field(
    settings: Settings, setting: str, needle: str
) -> None:
    cli = tradectl("task", "submit", "backtest", "--set", setting, env=service_env(settings))
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert needle in " ".join(cli.stderr.split())


def test_routed_to_cpu_unless_it_needs_the_gpu() -> None:
    assert route_of("backtest", {}) == ROUTE_CPU
    assert route_of("backtest", {"needs_gpu": True}) == ROUTE_GPU
    # The defaults are a valid SMA-crossover config: GOOG, 10/20 bars, 0.1 % commission.
    config = validate_config("backtest", {})
    assert isinstance(config, BacktestConfig)
    assert (config.strategy, config.fast_window, config.slow_window) == ("sma_crossover", 10, 20)


# --- agreement with backtesting.py ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast", "slow", "start", "end", "html"),
    [(10, 20, None, None, True), (15, 40, "2006-01-01", "2011-12-31", False)],
)
def test_sma_crossover_agrees_with_backtesting_py_run_directly(
    tmp_path: Path,
    tracking_uri: str,
    fast: int,
    slow: int,
    start: str | None,
    end: str | None,
    html: bool,
) -> None:
    cash, commission = 25_000.0, 0.002
    config = BacktestConfig(
        fast_window=fast,
        slow_window=slow,
        start=start,
        end=end,
        cash=cash,
        commission=commission,
        html_report=html,
    )
    ctx = make_context(tmp_path, "sma-1", tracking_uri)
    result = backtest.run(config, ctx)

    data = GOOG.loc[start:end]
    direct = Backtest(
        data, DirectSmaCross, cash=cash, commission=commission, finalize_trades=True
    ).run(n1=fast, n2=slow)

    metrics = result["metrics"]
    assert direct["# Trades"] > 10
    assert metrics["n_trades"] == direct["# Trades"]
    for ours, theirs in (
        ("return_pct", "Return [%]"),
        ("return_ann_pct", "Return (Ann.) [%]"),
        ("buy_hold_return_pct", "Buy & Hold Return [%]"),
    ):
        assert abs(metrics[ours] - direct[theirs]) < 0.5, (ours, metrics[ours], direct[theirs])
    assert metrics["max_drawdown_pct"] == pytest.approx(direct["Max. Drawdown [%]"], abs=0.5)
    assert metrics["sharpe_ratio"] == pytest.approx(direct["Sharpe Ratio"], abs=0.01)
    assert result["dataset"]["bars"] == len(data)
    assert result["dataset"]["start"] == data.index[0].isoformat()
    assert_artifacts(ctx, result, html=html)
    assert_mlflow_run(tracking_uri, result, config)


def assert_artifacts(ctx: TaskContext, result: dict[str, Any], *, html: bool) -> None:
    folder = ctx.artifact_dir
    expected = {"stats.json", "trades.csv", "equity_curve.csv", "equity_curve.png"}
    assert set(result["artifacts"]) == expected | ({"report.html"} if html else set())
    assert {p.name for p in folder.iterdir()} == set(result["artifacts"])
    stats = json.loads((folder / "stats.json").read_text())  # strict JSON: no NaN
    assert stats["metrics"] == result["metrics"]
    assert stats["library_stats"]["# Trades"] == result["metrics"]["n_trades"]
    assert stats["definitions"]["sharpe_ratio"]["source"] == "Sharpe Ratio"
    trades = pd.read_csv(folder / "trades.csv")
    assert len(trades) == result["metrics"]["n_trades"]
    assert {"EntryTime", "ExitTime", "EntryPrice", "ExitPrice", "PnL"} <= set(trades.columns)
    assert (folder / "equity_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(result, allow_nan=False)
    if html:
        assert_offline_report(folder / "report.html")


def assert_offline_report(path: Path) -> None:
    """The HTML report carries bokeh inline and nothing that reaches the internet."""
    page = path.read_text()
    assert "Bokeh" in page and len(page) > 500_000  # bokeh's JS inline
    tags = re.findall(r"<(?:script|link|iframe|img)\b[^>]*>", page)
    assert tags and not [t for t in tags if re.search(r"\b(?:src|href)\s*=", t)]
    assert "cdn.bokeh.org" not in page
    assert "kernc.github.io/backtesting.py/plx" not in page  # the library's usage counter


def assert_mlflow_run(tracking_uri: str, result: dict[str, Any], config: BacktestConfig) -> None:
    run = MlflowClient(tracking_uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["fast_window"] == str(config.fast_window)
    assert run.data.params["strategy"] == "sma_crossover"
    assert run.data.metrics["return_pct"] == pytest.approx(result["metrics"]["return_pct"])
    assert run.data.tags["tp.strategy"] == "sma_crossover"


def test_no_trades_leaves_undefined_metrics_out(tmp_path: Path, tracking_uri: str) -> None:
    """Steadily rising bars never cross: win rate and profit factor are undefined, not NaN."""
    n = 120
    close = 100.0 * np.exp(np.linspace(0.0, 0.3, n))
    bars = pd.DataFrame(
        {"Open": close, "High": close * 1.01, "Low": close * 0.99, "Close": close, "Volume": 1e6},
        index=pd.date_range("2021-01-04", periods=n, freq="B", name="date"),
    )
    csv = tmp_path / "rising.csv"
    bars.to_csv(csv)
    config = BacktestConfig(dataset=str(csv), html_report=False)
    result = backtest.run(config, make_context(tmp_path, "flat-1", tracking_uri))
    assert result["metrics"]["n_trades"] == 0.0
    assert result["metrics"]["return_pct"] == 0.0
    assert {"win_rate_pct", "profit_factor"} <= set(result["undefined_metrics"])
    assert not set(result["undefined_metrics"]) & set(result["metrics"])
    json.dumps(result, allow_nan=False)


def test_library_warnings_are_summarised_not_raised(tmp_path: Path, tracking_uri: str) -> None:
    """Cash below GOOG's price: backtesting.py warns (and cancels every order) on each bar."""
    config = BacktestConfig(cash=150.0, html_report=False)
    result = backtest.run(config, make_context(tmp_path, "poor-1", tracking_uri))
    assert result["metrics"]["n_trades"] == 0.0
    assert any("larger than initial cash" in w for w in result["warnings"])
    cancelled = [w for w in result["warnings"] if "insufficient margin" in w]
    assert len(cancelled) == 1 and "more like it" in cancelled[0]


# --- model signals -------------------------------------------------------------------------------


def test_target_positions() -> None:
    p_up = pd.Series([np.nan, 0.7, 0.52, 0.5, 0.45, 0.2])

    def targets(**kw: Any) -> list[float]:
        values = model_signals.target_positions(p_up, **kw).tolist()
        return [v if not math.isnan(v) else -9.0 for v in values]

    assert targets(threshold=0.5, invert=False, allow_short=True) == [-9, 1, 1, 0, -1, -1]
    assert targets(threshold=0.6, invert=False, allow_short=True) == [-9, 1, 0, 0, 0, -1]
    assert targets(threshold=0.5, invert=True, allow_short=True) == [-9, -1, -1, 0, 1, 1]
    assert targets(threshold=0.5, invert=False, allow_short=False) == [-9, 1, 1, 0, 0, 0]


def test_prediction_windows_are_the_training_samples() -> None:
    bars = load_ohlcv("GOOG")
    features = build_features(bars, 8).features
    windows = model_signals.prediction_windows(bars, 8)
    assert len(windows) == len(features) + 1  # the last bar has no target but a prediction
    np.testing.assert_array_equal(windows[: len(features)], features)


@pytest.mark.slow
def test_predictions_use_no_bar_after_their_own(tasks_root: Path, trained: str) -> None:
    path = tasks_root / trained / "artifacts" / "model.pt"
    model = model_signals.load_model(path, trained, "local")
    bars = load_ohlcv("GOOG")
    full = model_signals.up_probabilities(model, bars)
    assert full.iloc[:8].isna().all() and full.iloc[8:].between(0.0, 1.0).all()
    rng = np.random.default_rng(7)
    for cut in (8, 500, 1500):
        # Rewrite every bar after the cut (a random factor per bar, so returns change too):
        # the predictions up to the cut must not move.
        changed = bars.copy()
        later = len(bars) - cut - 1
        changed.iloc[cut + 1 :, :4] *= rng.uniform(0.8, 1.25, size=(later, 1))
        changed.iloc[cut + 1 :, 4] *= rng.uniform(0.5, 2.0, size=later)
        again = model_signals.up_probabilities(model, changed)
        np.testing.assert_array_equal(again.iloc[: cut + 1], full.iloc[: cut + 1])
        assert not np.allclose(again.iloc[cut + 20 :], full.iloc[cut + 20 :])


@pytest.mark.slow
def test_model_signal_trades_the_model_and_invert_flips_it(
    tmp_path: Path, tasks_root: Path, tracking_uri: str, trained: str
) -> None:
    results = {}
    for invert in (False, True):
        config = BacktestConfig(
            strategy="model_signal", model_task=trained, invert=invert, html_report=False
        )
        task_id = f"signal-{invert}"
        results[invert] = backtest.run(config, make_context(tasks_root, task_id, tracking_uri))
    plain, inverted = results[False], results[True]
    signals = pd.read_csv(tasks_root / "signal-False" / "artifacts" / "signals.csv", index_col=0)
    flipped = pd.read_csv(tasks_root / "signal-True" / "artifacts" / "signals.csv", index_col=0)
    np.testing.assert_array_equal(signals["p_up"], flipped["p_up"])
    assert (signals["target"].dropna() == -flipped["target"].dropna()).all()
    assert plain["metrics"]["return_pct"] != pytest.approx(inverted["metrics"]["return_pct"])
    assert plain["model"]["source"] == "local" and plain["model"]["feature_window"] == 8
    # Trained on GOOG's first 80 %: the backtest says how many of its bars were in-sample.
    assert 1500 < plain["model"]["in_sample_bars"] < plain["dataset"]["bars"]


async def upload_task(settings: Settings, task_dir: Path, task_id: str) -> None:
    """Copy a task's ``artifacts/`` to shared storage, manifest last, as artifact-sync does."""
    async with open_storage(settings) as storage:
        entries = []
        for path in sorted((task_dir / "artifacts").iterdir()):
            size, sha256 = file_digest(path)
            entry = ManifestEntry(path=f"artifacts/{path.name}", size=size, sha256=sha256)
            await storage.upload(task_id, entry, path, on_bytes=lambda _: None)
            entries.append(entry)
        manifest = Manifest(task_id=task_id, files=entries, complete=True, created_at=time.time())
        await storage.write_manifest(manifest)


@pytest.mark.slow
def test_model_comes_from_shared_storage_when_not_on_this_desktop(
    tmp_path: Path,
    tasks_root: Path,
    tracking_uri: str,
    trained: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drive = tmp_path / "drive"  # the mounted network drive of the path backend
    drive.mkdir()
    storage = Settings(artifact_backend="path", artifact_dir=drive, _env_file=None)
    asyncio.run(upload_task(storage, tasks_root / trained, trained))
    monkeypatch.setenv("TP_ARTIFACT_BACKEND", "path")
    monkeypatch.setenv("TP_ARTIFACT_DIR", str(drive))

    other_desktop = tmp_path / "tasks"  # has no folder of the model's task
    config = BacktestConfig(strategy="model_signal", model_task=trained, html_report=False)
    result = backtest.run(config, make_context(other_desktop, "remote-1", tracking_uri))
    assert result["model"]["source"] == "shared_storage"
    assert (other_desktop / "remote-1" / "inputs" / trained / "artifacts" / "model.pt").is_file()
    local = backtest.run(config, make_context(tasks_root, "local-1", tracking_uri))
    assert result["metrics"] == local["metrics"]


def test_missing_model_fails_with_a_clear_error(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TP_ARTIFACT_BACKEND", "none")
    config = BacktestConfig(strategy="model_signal", model_task="no-such-task")
    with pytest.raises(FileNotFoundError, match="model of task no-such-task not found"):
        backtest.run(config, make_context(tmp_path, "bt-1", tracking_uri))


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_model_signal_backtest_of_a_trained_model_through_the_queue(
    platform: Platform, client: DistributedClient
) -> None:
    await platform.start_all(TP_WORKER_CODE_UPDATE="ignore")
    model = await client.submit("train_model", TINY_MODEL)
    record = await client.wait(model.task_id, timeout_s=WAIT_S)
    assert record.state is TaskState.COMPLETED, record.error

    runs = {}
    for invert in (False, True):
        config = {"strategy": "model_signal", "model_task": model.task_id, "invert": invert}
        runs[invert] = await client.submit("backtest", config)
    done = {k: await client.wait(r.task_id, timeout_s=WAIT_S) for k, r in runs.items()}
    for outcome in done.values():
        assert outcome.state is TaskState.COMPLETED, outcome.error
    plain, inverted = done[False].result, done[True].result
    assert plain["model"]["task_id"] == model.task_id and plain["model"]["source"] == "local"
    metrics = plain["metrics"]
    assert abs(metrics["return_pct"] - metrics["buy_hold_return_pct"]) > 1.0
    assert metrics["n_trades"] > 5
    # The same model traded the other way round gives another result: the signals are used.
    assert abs(metrics["return_pct"] - inverted["metrics"]["return_pct"]) > 1.0
    assert metrics["n_trades"] != inverted["metrics"]["n_trades"] or (
        metrics["win_rate_pct"] != inverted["metrics"]["win_rate_pct"]
    )
    folder = platform.settings.tasks_dir / done[False].task_id / "artifacts"
    assert {"stats.json", "trades.csv", "equity_curve.png", "report.html", "signals.csv"} <= {
        p.name for p in folder.iterdir()
    }
    assert_offline_report(folder / "report.html")
