# The way in. `just --list` shows the recipes.

# Install, start scheduler + worker, train on GOOG daily, print metrics and the MLflow run.
demo:
    bash scripts/quickstart.sh

# Install everything, lint, type-check and run the tests (what CI runs).
test *ARGS:
    bash scripts/test.sh {{ARGS}}

# Lint and type-check only.
lint:
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy

# Format the code.
fmt:
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .

# Run the scheduler in the foreground.
scheduler:
    .venv/bin/python -m services.scheduler

# Run a worker in the foreground.
worker:
    .venv/bin/python -m services.gpu_worker

# Run git-sync in the foreground (keeps TP_CODE_DIR current: fetch + fast-forward only).
git-sync:
    .venv/bin/python -m services.git_sync

# Soak: 2,000 probe tasks while a random worker is SIGKILLed every 3 s; fails on a lost or doubled task.
bench-soak *ARGS:
    .venv/bin/python -m bench.soak {{ARGS}}

# Artifact upload throughput: our artifact sync beside plain boto3 on one moto S3 server.
bench-artifacts *ARGS:
    .venv/bin/python -m bench.artifacts {{ARGS}}

# Dispatch: our scheduler and worker beside a Celery 5 worker on the same RabbitMQ and Redis.
bench-dispatch *ARGS:
    .venv/bin/python -c 'import celery' 2>/dev/null || .venv/bin/pip install -q -e '.[bench]'
    .venv/bin/python -m bench.dispatch {{ARGS}}

# train_model run directly and through the whole system: wall times and the ratio.
bench-training *ARGS:
    .venv/bin/python -c 'import celery' 2>/dev/null || .venv/bin/pip install -q -e '.[bench]'
    .venv/bin/python -m bench.training {{ARGS}}

# Idle resident memory of each service (the light four must stay under 100 MB, without torch).
bench-memory *ARGS:
    .venv/bin/python -m bench.idle_memory {{ARGS}}

# Every benchmark that finishes in minutes (the soak runs separately: just bench-soak).
bench: bench-artifacts bench-dispatch bench-training bench-memory

# Run artifact-sync in the foreground (needs TP_ARTIFACT_BACKEND and its storage settings).
artifact-sync:
    .venv/bin/python -m services.artifact_sync

# Health, metrics, alerts and the dashboard on http://127.0.0.1:8400/.
health-monitor:
    .venv/bin/python -m services.health_monitor

# Install the systemd units on this desktop (as root; --dry-run prints, --root DIR installs there).
install-systemd *ARGS:
    bash scripts/install-systemd.sh {{ARGS}}
