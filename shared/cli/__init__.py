"""``tradectl``: the laptop's command line (typer + rich).

``tradectl task ...`` submits and follows tasks (and publishes those run locally),
``tradectl sync ...`` shows and drives git-sync,
``tradectl artifacts ...`` shows artifact sync to shared storage, ``tradectl worker ...`` shows,
drains and starts gpu-workers, ``tradectl queue ...`` shows queue depths and dead letters,
``tradectl schedule ...`` keeps recurring submissions, ``tradectl pipeline ...`` submits chains,
``tradectl config show`` prints the settings with secrets hidden.
"""

from __future__ import annotations

import typer

from shared.cli.artifacts import artifacts_app
from shared.cli.config import config_app
from shared.cli.local_runs import sync_local
from shared.cli.pipelines import pipeline_app
from shared.cli.queues import queue_app
from shared.cli.schedules import schedule_app
from shared.cli.sync import sync_app
from shared.cli.tasks import parse_config, parse_set_value, print_event, task_app
from shared.cli.workers import worker_app

app = typer.Typer(
    help="Submit and follow trading-research tasks on the desktop.", no_args_is_help=True
)
task_app.command("sync-local")(sync_local)
app.add_typer(task_app, name="task")
app.add_typer(sync_app, name="sync")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(worker_app, name="worker")
app.add_typer(queue_app, name="queue")
app.add_typer(schedule_app, name="schedule")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(config_app, name="config")

__all__ = ["app", "parse_config", "parse_set_value", "print_event"]
