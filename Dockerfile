# syntax=docker/dockerfile:1
# Build stage: install the worker and its dependencies into a virtual environment.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .

# Runtime stage: the venv only, run as an unprivileged user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home worker
COPY --from=build /opt/venv /opt/venv
COPY config /app/config
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2); sys.exit(0)"]
ENTRYPOINT ["chat-worker"]
CMD ["run"]
