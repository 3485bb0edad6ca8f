# Two commands on a fresh machine:
#   make serve   set up .venv with every engine, then start the server (pass flags with ARGS="...")
#   make test    set up .venv with the test tools, then lint and run the tests
#   make container-test  build the Dockerfile and run it with podman (minutes; see README)
#   make bench   the benchmark behind BENCHMARKS.md (ARGS=--quick: a ~5 minute smoke run)
#   make grpc-code  regenerate keras_server/rpc/'s protobuf modules from its .proto (checked in)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench container-test grpc-code preflight

# The dependencies live in pyproject.toml; the requirements files name its extras.
$(BIN)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

serve: $(BIN)/.runtime
	$(BIN)/python run_keras_server.py $(ARGS)

lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The programs the tests drive (chromium, nginx, prometheus, wrk), checked
# before anything else: installed with apt-get as root, otherwise the
# apt-get line to run is printed and make stops. The tests install nothing.
preflight:
	$(PYTHON) tests/preflight.py

test: preflight lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same for podman, runc, debootstrap and CNI's dnsname plugin.
container-test:
	$(PYTHON) tests/preflight.py --container
	$(MAKE) $(BIN)/.dev
	$(BIN)/python -m pytest -m container $(PYTEST_ARGS)

bench: $(BIN)/.dev
	$(BIN)/python -m bench.run $(ARGS)

# The pinned grpcio-tools of the dev extra; tests/test_grpc.py checks the result is current.
grpc-code: $(BIN)/.dev
	$(BIN)/python -m keras_server.rpc.codegen
