# syntax=docker/dockerfile:1
# One image for every role: `outbox serve` (default), `outbox dispatch`, `outbox migrate`,
# `outbox purge`. Not built in CI (no container engine there): tests/ops checks it statically.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: a venv with the dependencies (all wheels: psycopg[binary] bundles libpq, so no
# compiler or libpq-dev) and outbox installed from /app, the path it keeps at run time
# (the SQL files are read from /app/sql, beside the package). The dependencies are the
# pinned, hash-checked set of requirements.lock (`make lock`), the versions the tests ran.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /app
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY sql ./sql
RUN /opt/venv/bin/pip install --no-deps --editable . \
    && /opt/venv/bin/python -m compileall -q /app/outbox

# Run: the slim base, the venv and the source; no build tools, no root.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 outbox \
    && useradd --system --uid 10001 --gid outbox --home-dir /app --shell /usr/sbin/nologin outbox
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTBOX_HOST=0.0.0.0 \
    OUTBOX_PORT=8001 \
    OUTBOX_LOG_FORMAT=json
# Numeric, so an orchestrator's runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8001
# No curl in slim: the standard library asks /healthz (the API process is alive).
# compose.yaml gives the dispatcher, which serves no API, a check of its own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OUTBOX_PORT', '8001'), timeout=2)"]
ENTRYPOINT ["outbox"]
CMD ["serve"]
