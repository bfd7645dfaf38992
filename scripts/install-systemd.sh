#!/usr/bin/env bash
# Install the tradeplat desktop services as systemd units (run as root on the desktop).
#
#   sudo bash scripts/install-systemd.sh            # or: sudo just install-systemd
#   systemctl start trading.target                  # then: journalctl -u 'trading-*' -f
#
# Expects the project at /opt/tradeplat (a checkout with .venv from scripts/install.sh; --project
# names another, the units' paths must then be changed to match). What it does, each step skipped
# when already done:
#   - system user tradeplat (home /var/lib/tradeplat, no login; in groups video/render if present)
#   - /etc/tradeplat/tradeplat.env from infra/systemd/tradeplat.env.example (0640; an existing
#     one is kept), /etc/tradeplat/secrets (0700: one file per secret, see the env file's header)
#   - /var/lib/tradeplat (0750, the data folder); the checkout owned by tradeplat (git-sync
#     writes it)
#   - the units in /etc/systemd/system, daemon-reload, and enabled: trading.target, one
#     trading-worker@<N>.service per GPU that `nvidia-smi -L` lists (@0 without GPUs, a CPU worker),
#     trading-artifact-sync.service when the env file sets TP_ARTIFACT_BACKEND=s3 or path.
#
# Options:
#   --root DIR   install into DIR instead of / (packaging, tests): files only, no user, no chown,
#                units enabled with `systemctl --root=DIR` (offline), nothing started or reloaded
#   --dry-run    print what would be done, change nothing
#   --gpus N     workers for N GPUs instead of counting them with nvidia-smi
#   --project D  the checkout the units run (default /opt/tradeplat)
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
DRY_RUN=0
GPUS=""
PROJECT=/opt/tradeplat
SERVICE_USER=tradeplat

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --gpus) GPUS="${2:?--gpus needs a number}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a folder}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "install-systemd: unknown option $1" >&2; usage ;;
  esac
done
case "$GPUS" in
  ''|[0-9]|[0-9][0-9]) ;;
  *) echo "install-systemd: --gpus must be a number" >&2; exit 2 ;;
esac
if [ -n "$ROOT" ]; then
  ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
elif [ "$(id -u)" != 0 ] && [ "$DRY_RUN" = 0 ]; then
  echo "install-systemd: run as root (or with --root DIR / --dry-run)" >&2
  exit 1
fi

ETC="$ROOT/etc/tradeplat"
UNIT_DIR="$ROOT/etc/systemd/system"
DATA="$ROOT/var/lib/tradeplat"

# Each change goes through run: printed, and executed unless --dry-run.
run() {
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# True when systemd runs this machine (PID 1), so systemctl can reload and start units.
systemd_running() { [ -d /run/systemd/system ]; }

gpu_count() {
  if [ -n "$GPUS" ]; then echo "$GPUS"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

create_user() {
  if getent passwd "$SERVICE_USER" >/dev/null; then
    echo "user $SERVICE_USER exists"
  else
    run useradd --system --user-group --home-dir /var/lib/tradeplat --no-create-home \
      --shell /usr/sbin/nologin --comment "tradeplat services" "$SERVICE_USER"
  fi
  # /dev/nvidia* belong to one of these on some distributions (mode 0660).
  for group in video render; do
    if getent group "$group" >/dev/null; then run usermod -a -G "$group" "$SERVICE_USER"; fi
  done
}

install_files() {
  run install -d -m 0755 "$ETC" "$UNIT_DIR"
  run install -d -m 0700 "$ETC/secrets"
  if [ -e "$ETC/tradeplat.env" ]; then
    echo "kept $ETC/tradeplat.env"
  else
    run install -m 0640 "$SRC/infra/systemd/tradeplat.env.example" "$ETC/tradeplat.env"
  fi
  run install -d -m 0750 "$DATA"
  run install -m 0644 "$SRC"/infra/systemd/*.service "$SRC"/infra/systemd/trading.target \
    "$UNIT_DIR/"
}

own_folders() {
  run chown "$SERVICE_USER:$SERVICE_USER" "$DATA"
  if [ -d "$PROJECT/.git" ]; then
    # git-sync fast-forwards the checkout as tradeplat (git refuses a repository another user owns).
    run chown -R "$SERVICE_USER:$SERVICE_USER" "$PROJECT"
  else
    echo "warning: no git checkout at $PROJECT (clone it there and run scripts/install.sh)" >&2
  fi
  if [ ! -x "$PROJECT/.venv/bin/python" ]; then
    echo "warning: $PROJECT/.venv/bin/python missing: run scripts/install.sh in $PROJECT" >&2
  fi
}

# The units to enable: the target, a worker per GPU, artifact-sync when storage is configured.
units_to_enable() {
  local n i backend
  n="$(gpu_count)"
  echo trading.target
  if [ "$n" = 0 ]; then echo "trading-worker@0.service"; fi
  for ((i = 0; i < n; i++)); do echo "trading-worker@$i.service"; done
  backend="$(sed -n 's/^[[:space:]]*TP_ARTIFACT_BACKEND=["'"'"']\{0,1\}\([a-z0-9]*\).*/\1/p' \
    "$ETC/tradeplat.env" 2>/dev/null | tail -n 1)"
  case "$backend" in s3|path) echo trading-artifact-sync.service ;; esac
}

enable_units() {
  local units
  mapfile -t units < <(units_to_enable)
  if [ -n "$ROOT" ]; then
    if command -v systemctl >/dev/null 2>&1; then
      run systemctl --root="$ROOT" --quiet enable "${units[@]}"
    else
      echo "no systemctl here: enable ${units[*]} on the target machine"
    fi
  elif systemd_running; then
    run systemctl daemon-reload
    run systemctl enable "${units[@]}"
    echo "start them: systemctl start trading.target   (logs: journalctl -u 'trading-*' -f)"
  else
    # Not booted with systemd (a container, an image build): systemctl enables offline.
    run systemctl --quiet enable "${units[@]}"
  fi
}

if [ -z "$ROOT" ]; then create_user; fi
install_files
if [ -z "$ROOT" ]; then own_folders; fi
enable_units
echo "secrets: one file each in $ETC/secrets (amqp_password, redis_password, ...; mode 0600)"
