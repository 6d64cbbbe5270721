# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint image clean

$(BIN)/chat-worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/chat-worker

demo: install
	.ci/ensure-rabbitmq
	$(BIN)/chat-worker demo

# pytest exits 5 when it collects no test; make treats that as the failure it is.
test: install
	.ci/ensure-rabbitmq
	.ci/ensure-redis
	.ci/ensure-prometheus
	$(BIN)/ruff check worker tests bench scripts
	$(BIN)/ruff format --check worker tests bench scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check worker tests bench scripts
	$(BIN)/ruff format --check worker tests bench scripts
	$(BIN)/mypy

# Build the container image with podman, lint the Dockerfile, report its size, and run it as
# uid 10001 until /healthz and the HEALTHCHECK pass. Slow (76 s the first time, then 21 s):
# not part of `make test`.
image: install
	.ci/ensure-rabbitmq
	scripts/build-image

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
