"""Pipelines: a YAML chain submitted in one command, each step's result feeding the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.client import DistributedClient
from shared.errors import PipelineError
from shared.messages import TaskState
from shared.pipelines import load_pipeline, parse_pipeline, plan
from shared.settings import Settings
from shared.task_types import TASK_TYPES
from tests.conftest import ROOT, Platform, tradectl
from tests.test_dependencies import FAST, cli_env, unpinned  # noqa: F401 - a fixture

EXAMPLES = ROOT / "examples"


@pytest.mark.slow
async def test_three_step_pipeline_feeds_each_result_to_the_next(
    platform: Platform, client: DistributedClient
):
    await platform.start_all(**FAST)
    cli = tradectl(
        "pipeline", "submit", str(EXAMPLES / "pipeline_probe_train.yaml"), "--wait", "--json",
        "--timeout", "120", env=cli_env(platform.settings), timeout=150,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    steps = json.loads(cli.stdout)["steps"]
    assert [s["state"] for s in steps.values()] == ["completed"] * 3, steps
    measure, train, check = [await client.status(s["task_id"]) for s in steps.values()]
    # Each step ran after its parent and took its value from the parent's result.
    assert measure.completed_at <= train.queued_at and train.completed_at <= check.queued_at
    assert train.depends_on == [measure.task_id] and check.depends_on == [train.task_id]
    assert train.config["epochs"] == measure.result["metrics"]["steps"] == 2
    assert train.result["epochs_run"] == 2
    assert check.config["steps"] == 2 and check.result["metrics"]["steps"] == 2
    assert train.config_template["epochs"] == "${steps.measure.result.metrics.steps}"


@pytest.mark.slow
async def test_a_failing_step_fails_the_steps_after_it(
    platform: Platform, client: DistributedClient, tmp_path: Path
):
    await platform.start_all(**FAST)
    path = tmp_path / "failing.yaml"
    path.write_text(
        """
name: failing
steps:
  - {name: first, type: probe, config: {fail_with: boom}}
  - {name: second, type: probe, depends_on: [first]}
  - {name: third, type: probe, config: {steps: "${steps.second.result.metrics.steps}"}}
  - {name: aside, type: probe}
"""
    )
    cli = tradectl("pipeline", "submit", str(path), "--wait", env=cli_env(platform.settings))
    assert cli.returncode == 1, cli.stderr
    ids = dict(line.split("\t") for line in cli.stdout.splitlines())
    assert list(ids) == ["first", "aside", "second", "third"]  # parents first, else file order
    first, second, third, aside = [
        await client.status(ids[n]) for n in ("first", "second", "third", "aside")
    ]
    assert first.state is TaskState.FAILED and aside.state is TaskState.COMPLETED
    assert second.error == f"parent {first.task_id} failed: RuntimeError: boom"
    assert third.error.startswith(f"parent {second.task_id} failed: parent {first.task_id}")
    for record in (first, second, third):  # each step printed as it ended
        assert f"failed: {record.error}" in cli.stderr
    assert f"step aside ({aside.task_id}) completed" in cli.stderr


async def test_an_idempotency_key_makes_a_resubmit_the_same_tasks(
    unpinned: DistributedClient,  # noqa: F811
):
    pipeline = load_pipeline(EXAMPLES / "pipeline_probe_train.yaml")
    first = await unpinned.submit_pipeline(pipeline, idempotency_key="night-1")
    again = await unpinned.submit_pipeline(pipeline, idempotency_key="night-1")
    other = await unpinned.submit_pipeline(pipeline, idempotency_key="night-2")
    assert {n: r.task_id for n, r in first.items()} == {n: r.task_id for n, r in again.items()}
    assert not {r.task_id for r in first.values()} & {r.task_id for r in other.values()}
    assert len(await unpinned.list_tasks(100)) == 6


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("steps: []", "steps: List should have at least 1 item"),
        ("steps: [{name: a, type: probe, confg: {}}]", "steps.0.confg: Extra inputs"),
        (
            "steps: [{name: a, type: probe}, {name: a, type: probe}]",
            "steps: duplicate step name 'a'",
        ),
        ("steps: [{name: a, type: probe, depends_on: [b]}]", "steps.a.depends_on.0: unknown step"),
        ("steps: [{name: a, type: probe, config_from: {b: x}}]", "steps.a.config_from.b: unknown"),
        (
            "steps: [{name: a, type: probe, config: {steps: '${steps.zz.task_id}'}}]",
            "steps.a.config.steps: unknown step 'zz'",
        ),
        (
            "steps: [{name: a, type: probe, config: {fail_with: 'x ${steps.b.task_id}'}}, "
            "{name: b, type: probe}]",
            "steps.a.config.fail_with: 'x ${steps.b.task_id}' is not a reference",
        ),
        (
            "steps: [{name: a, type: probe, config: {x: ['${steps.b.task_id}']}}, "
            "{name: b, type: probe}]",
            "steps.a.config.x.0: references inside lists",
        ),
        ("steps: [{name: a, type: probe, depends_on: [a]}]", "steps.a: a step cannot depend on"),
        (
            "steps: [{name: a, type: probe, depends_on: [c]}, {name: b, type: probe, "
            "depends_on: [a]}, {name: c, type: probe, config: {steps: '${steps.b.result.n}'}}]",
            "steps: cycle a -> c -> b -> a",
        ),
        (
            "steps: [{name: a, type: probe}, {name: b, type: probe, "
            "config: {stepz: '${steps.a.result.n}', sleep_s: -1}}]",
            "steps.b.config: invalid probe config: sleep_s: Input should be greater than or "
            "equal to 0; stepz: Extra inputs are not permitted",
        ),
        ("steps: [{name: a, type: nope}]", "steps.a.config: unknown task type 'nope'"),
        ("steps: {a: 1", "is not valid YAML"),
        # A "YAML bomb": each alias doubles the one before; never expanded, refused at once.
        (
            "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nsteps: [{name: s, type: probe, "
            "config: {z: *c}}]",
            "YAML aliases (*a) are not allowed",
        ),
        ("steps: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_bad_pipelines_are_refused_naming_the_field(document: str, message: str):
    with pytest.raises(PipelineError) as refused:
        parse_pipeline(document)
    assert message in str(refused.value)


def test_plan_orders_parents_first_and_the_cli_validates(settings: Settings, tmp_path: Path):
    pipeline = parse_pipeline(
        """
steps:
  - {name: report, type: probe, config: {steps: "${steps.train.result.epochs_run}"}}
  - {name: train, type: train_model, config_from: {search: best}, depends_on: [data]}
  - {name: search, type: probe}
  - {name: data, type: probe}
"""
    )
    order = plan(pipeline)
    assert [p.name for p in order] == ["search", "data", "train", "report"]
    train = order[2]
    assert train.parents == ["data", "search"]
    assert [(r.target, r.step, r.source, r.merge) for r in train.refs] == [
        ("", "search", "result.best", True)
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [{name: a, type: probe, depends_on: [b]}]")
    for command in ("validate", "submit"):
        refused = tradectl("pipeline", command, str(bad), env=cli_env(settings))
        assert refused.returncode == 2 and "steps.a.depends_on.0: unknown step 'b'" in (
            refused.stderr
        )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("pipeline_*.yaml")), ids=lambda p: p.name)
def test_example_pipelines_are_valid(path: Path):
    pipeline = load_pipeline(path) if _types_known(path) else None
    if pipeline is None:
        pytest.skip(f"{path.name} uses a task type not registered here")
    assert len(plan(pipeline)) == len(pipeline.steps)


def _types_known(path: Path) -> bool:
    import yaml

    steps = yaml.safe_load(path.read_text())["steps"]
    return all(step["type"] in TASK_TYPES for step in steps)


GOOG_CHAIN = """
name: goog-chain
steps:
  - name: search
    type: hyperopt
    config:
      target: train_model
      base_config: {dataset: GOOG, epochs: 1, feature_window: 8, hidden_size: 8, device: cpu}
      search_space:
        learning_rate: {type: float, low: 0.0005, high: 0.01, log: true}
        hidden_size: {type: categorical, choices: [8, 16]}
      metric: val_loss
      direction: minimize
      n_trials: 4
      seed: 7
  - name: train
    type: train_model
    config_from: {search: best_params}
    config: {dataset: GOOG, epochs: 2, feature_window: 8, device: cpu}
  - name: backtest
    type: backtest
    config:
      dataset: GOOG
      strategy: model_signal
      model_task: ${steps.train.task_id}
      commission: 0.002
"""


@pytest.mark.slow
async def test_search_train_best_backtest_on_goog(
    platform: Platform, client: DistributedClient, tmp_path: Path
):
    """The issue's chain: hyperopt -> train_model on the best parameters -> backtest of it."""
    await platform.start_all(
        TP_WORKER_CODE_UPDATE="ignore", TP_SCHEDULE_POLL_S="0.2", OMP_NUM_THREADS="1"
    )
    path = tmp_path / "chain.yaml"
    path.write_text(GOOG_CHAIN)
    cli = tradectl(
        "pipeline", "submit", str(path), "--wait", "--json", "--timeout", "240",
        env=cli_env(platform.settings), timeout=270,
    )  # fmt: skip
    assert cli.returncode == 0, (cli.stdout, cli.stderr)
    steps = json.loads(cli.stdout)["steps"]
    search, train, backtest = [await client.status(s["task_id"]) for s in steps.values()]
    assert [r.state for r in (search, train, backtest)] == [TaskState.COMPLETED] * 3
    best = search.result["best_params"]
    assert set(best) == {"learning_rate", "hidden_size"}
    # The training ran on the search's best parameters, the backtest traded that model.
    assert train.config["learning_rate"] == best["learning_rate"]
    assert train.config["hidden_size"] == best["hidden_size"]
    assert backtest.config["model_task"] == train.task_id
    assert search.completed_at <= train.queued_at and train.completed_at <= backtest.queued_at
    stats = backtest.result["metrics"]
    assert "sharpe_ratio" in stats and "max_drawdown_pct" in stats
