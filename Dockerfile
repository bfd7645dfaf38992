# Slim image for the non-GPU services: scheduler, git-sync, artifact-sync and health-monitor
# (docker-compose.yml sets each one's command). Base dependencies only: no torch, no MLflow.
FROM python:3.11.13-slim-bookworm

# git and ssh for git-sync (fetch over SSH with a deploy key) and for reading the checkout's
# commit; tini is not needed here: compose runs every service with `init: true`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* openssh-client=1:9.2p1-* \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# One non-root user, the same uid in both images: the git checkout and the data volume are
# shared between containers, and git refuses a repository owned by another uid.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/tradeplat tradeplat \
    && install -d -o tradeplat -g tradeplat /srv/checkout /var/lib/tradeplat/data

WORKDIR /opt/tradeplat
# Dependencies first, from pyproject.toml alone: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies']))" >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the code (README.md: pyproject names it as the package's readme).
COPY README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER 10001:10001
WORKDIR /var/lib/tradeplat
ENV TP_DATA_DIR=/var/lib/tradeplat/data \
    HEALTHCHECK_KIND=scheduler
# The service kind to check comes from HEALTHCHECK_KIND (compose sets a healthcheck per service).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec python -m shared.healthcheck \"$HEALTHCHECK_KIND\""]
CMD ["python", "-m", "services.scheduler"]
