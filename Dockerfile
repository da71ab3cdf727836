# syntax=docker/dockerfile:1
# The mailer service image. Build: docker build -t registry.example.com/crm/mailer:0.1.0 .
# BuildKit is required (the default builder since Docker 23) for the wheel bind mount below.
#
# Both stages use the same Debian release (bookworm) so the wheels built in the first one
# match the libc of the second; the tag names the Debian release so a base-image update
# cannot silently move the image to a new distribution. Pin by digest in your registry's
# mirror if you need byte-for-byte reproducible builds.

# --- builder: wheels of mailer and of every dependency --------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what setuptools needs to build the wheel (.dockerignore keeps the rest out): the
# package-data globs in pyproject.toml take the SQL files under mailer/ along.
COPY pyproject.toml README.md ./
COPY mailer ./mailer
# All dependencies ship manylinux wheels, so no compiler is needed here.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes; pip already
# compiled the bytecode at install time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mailer/bin:$PATH \
    MAILER_ENV=production \
    MAILER_HTTP_HOST=0.0.0.0 \
    MAILER_HTTP_PORT=8080 \
    MAILER_PUBLIC_HTTP_HOST=0.0.0.0 \
    MAILER_PUBLIC_HTTP_PORT=8081

# A numeric, fixed uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER, and
# deploy/k8s/deployment.yaml sets the same ids.
RUN groupadd --system --gid 10001 mailer \
    && useradd --system --uid 10001 --gid mailer --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mailer

# The wheels are bind-mounted from the builder instead of copied, so they never become a
# layer of the final image. The last two commands are a smoke test: the console script
# imports the whole service, and the working-hours time zone must resolve (tzdata).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/mailer \
    && /opt/mailer/bin/pip install --no-cache-dir --no-index --find-links=/wheels mailer \
    && mailer --help > /dev/null \
    && python -c "import zoneinfo; zoneinfo.ZoneInfo('Europe/Moscow')"

# An empty directory: load_settings() reads ./.env, and none must be found in production.
WORKDIR /app

USER 10001:10001

EXPOSE 8080 8081

# mailer handles SIGTERM itself: it stops its actors within MAILER_SHUTDOWN_TIMEOUT_SECONDS.
STOPSIGNAL SIGTERM

# For docker/compose only; Kubernetes ignores it and uses the probes in deploy/k8s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MAILER_HTTP_PORT', '8080') + '/healthz', timeout=4)"]

# Exec form: mailer is PID 1 and receives SIGTERM directly (no shell in between).
ENTRYPOINT ["mailer"]
CMD ["run"]
