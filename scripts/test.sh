#!/usr/bin/env bash
# Install everything, then lint, type-check and run the whole test suite against the real
# RabbitMQ and Redis on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/ensure-services.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
pytest -q "$@"
