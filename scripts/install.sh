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
# The dashboard's browser test drives Debian's Chromium (never a browser Playwright downloads).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium not installed (apt-get install chromium as root): the dashboard test skips, or fails under CI" >&2
  fi
fi
# The deployment test validates docker-compose.yml offline with Debian's docker-compose (v1.29.2;
# no Docker engine needed).
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  else
    echo "docker-compose not installed (apt-get install docker-compose as root): the compose test skips, or fails under CI" >&2
  fi
fi
echo "installed into .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
