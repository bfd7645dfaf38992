#!/usr/bin/env bash
# Create .venv and install the project with the worker and dev extras.
# torch is installed first with an exact pin: on the project's build machines pip takes that CPU
# build from local disk; a bare "torch" requirement would pull a multi-GB CUDA build instead.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." on a GPU desktop).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "pip>=23"
# shellcheck disable=SC2086
python -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q --disable-pip-version-check -e ".[worker,dev]"
echo "installed into .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
