# syntax=docker/dockerfile:1
# The base needs Python 3.11+ with venv and `useradd`: python:3.11-slim by default;
# scripts/build-image passes a Debian bookworm root built by debootstrap where no image registry
# is reachable.
ARG BASE_IMAGE=python:3.11-slim

# Build stage: install the worker and its dependencies into a virtual environment.
FROM ${BASE_IMAGE} AS build
# Where pip finds packages; scripts/build-image points it at a wheelhouse it mounts.
ARG PIP_INDEX_URL=https://pypi.org/simple
WORKDIR /src
# python3, not python: Debian's interpreter has no `python` alias (the venv's has).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install --no-cache-dir --index-url "$PIP_INDEX_URL" .

# Runtime stage: the venv only, run as an unprivileged user.
FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --no-create-home worker
COPY --from=build /opt/venv /opt/venv
COPY config /app/config
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# The port follows WORKER_HTTP_PORT, so that moving the health port does not fail the check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORKER_HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["chat-worker"]
CMD ["run"]
