# Two commands on a fresh machine:
#   make serve   set up .venv with every engine, then start the server (pass flags with ARGS="...")
#   make test    set up .venv with the test tools, then lint and run the tests
#                (every test; prints the 20 slowest)
#   make test-quick  the tests that need no server and no model (about a minute)
#   make fuzz    the Hypothesis tests at depth (profile `deep`; minutes)
#   make soak    the 20-minute soak of bench/soak.py (the tests run a short one)
#   make container-test  build the Dockerfile and run it with podman (minutes; see README)
#   make bench   the benchmark behind BENCHMARKS.md (ARGS=--quick: a ~5 minute smoke run)
#   make grpc-code  regenerate keras_server/rpc/'s protobuf modules from its .proto (checked in)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test test-quick fuzz soak test-wheels lint bench container-test grpc-code preflight

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

# Three pytest processes (xdist) on 2 cores: most tests wait on a server
# more than they compute. A module whose tests share a server runs in one.
TEST_PROCESSES ?= 3
test: preflight lint test-wheels
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup --durations=20 $(PYTEST_ARGS)

# Not slow: no server process, no ResNet50 (tests/conftest.py says what slow means).
test-quick: $(BIN)/.dev
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup -m "not slow" --durations=10 $(PYTEST_ARGS)

fuzz: $(BIN)/.dev
	$(BIN)/python -m pytest --hypothesis-profile deep tests/test_fuzz_parsers.py tests/test_fuzz_server.py $(PYTEST_ARGS)

soak: $(BIN)/.dev
	$(BIN)/python -m bench.soak $(ARGS)

# tests/test_packaging.py installs the base package into a fresh venv with
# pip --no-index from here: the wheels of the package (built from what the
# Dockerfile copies) and of its dependencies, fetched now, never during the tests.
WHEELS := build/test-wheels
$(WHEELS)/.done: pyproject.toml $(shell find keras_server -type f -not -name '*.pyc' 2>/dev/null) | $(BIN)/.dev
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)/source
	cp pyproject.toml $(WHEELS)/source/ && cp -r keras_server $(WHEELS)/source/
	find $(WHEELS)/source -name __pycache__ -prune -exec rm -rf {} +
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --wheel-dir $(WHEELS) $(WHEELS)/source
	rm -rf $(WHEELS)/source
	touch $@

test-wheels: $(WHEELS)/.done

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
