#!/usr/bin/env bash
# The main job end to end on this machine: install, start the scheduler and the worker as
# processes, submit train_model on GOOG daily bars from the CLI, wait for it, print its metrics
# and the MLflow run that holds its params and metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/ensure-services.sh
. .venv/bin/activate
export TP_DATA_DIR=${TP_DATA_DIR:-$PWD/data}
mkdir -p "$TP_DATA_DIR/logs"
python -m services.scheduler >"$TP_DATA_DIR/logs/scheduler.log" 2>&1 &
scheduler=$!
python -m services.gpu_worker >"$TP_DATA_DIR/logs/gpu-worker.log" 2>&1 &
worker=$!
trap 'kill $scheduler $worker 2>/dev/null; wait $scheduler $worker 2>/dev/null || true' EXIT
echo "scheduler pid $scheduler, worker pid $worker; logs in $TP_DATA_DIR/logs"

tradectl task submit train_model --config configs/train_goog.yaml --wait --json \
  >"$TP_DATA_DIR/last-task.json" || { cat "$TP_DATA_DIR/last-task.json"; exit 1; }
task_id=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["task_id"])' \
  "$TP_DATA_DIR/last-task.json")
tradectl task result "$task_id"
python examples/show_mlflow_run.py "$task_id"
