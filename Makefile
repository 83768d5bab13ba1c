# pgws developer commands. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# `make run` needs only pgws and its embedded PostgreSQL, not the development tools.
RUN_STAMP := $(VENV)/.run-stamp

.PHONY: install run db fmt lint types test test-db test-floors check bench soak soak-durable clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $(RUN_STAMP)

## run: the gateway on http://localhost:3000 with sample-env and the example chat page;
##      starts an embedded PostgreSQL in .pgdata/ unless PGWS_DB_URI is set;
##      another port: PGWS_PORT=3001 make run; Ctrl-C stops it
run: $(RUN_STAMP)
	PGWS_ROOT_PATH="$${PGWS_ROOT_PATH:-$(CURDIR)/example}" $(BIN)/python -m dev.demo --env-file sample-env

## db: a throwaway PostgreSQL for the tests (prints PGWS_TEST_DB_URI; Ctrl-C stops it)
db: install
	$(BIN)/python -m dev.devdb

fmt: install
	$(BIN)/ruff format pgws tests bench dev
	$(BIN)/ruff check --fix pgws tests bench dev

lint: install
	$(BIN)/ruff format --check pgws tests bench dev
	$(BIN)/ruff check pgws tests bench dev

types: install
	$(BIN)/mypy

## test: the whole suite against a real PostgreSQL (a throwaway cluster unless PGWS_TEST_DB_URI),
##       every event loop in asyncio debug mode (the in-process ones and the pgws subprocesses)
test: install
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest --asyncio-debug

## test-db: only the tests that talk to a database (CI runs them against a second PostgreSQL)
test-db: install
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest --asyncio-debug -m "not nodb"

## test-floors: a fresh venv with every runtime dependency at the floor pyproject.toml declares
##              (tests/floors.py turns each >=X into ==X) and the build backend at its floor, then
##              a smoke subset on it: handshakes, messages both ways, plain HTTP, the CLI, logs,
##              and the websockets internals pgws.fanout and pgws.sse rely on
FLOOR_VENV ?= $(or $(TMPDIR),/tmp)/pgws-floors-venv
SMOKE_TESTS := tests/test_gateway.py tests/test_http.py tests/test_cli.py tests/test_logs.py tests/test_fanout.py \
               tests/test_sse.py
test-floors:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(PYTHON) tests/floors.py > $(FLOOR_VENV)/floors.txt
	$(PYTHON) tests/floors.py --build-system > $(FLOOR_VENV)/build-floors.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -r $(FLOOR_VENV)/build-floors.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-build-isolation . -r $(FLOOR_VENV)/floors.txt
	@echo "== floors installed:" $$(sed -n 's/\[[^]]*\]//;/==/p' $(FLOOR_VENV)/*floors.txt)
	$(FLOOR_VENV)/bin/python -m pip check
	PYTHONASYNCIODEBUG=1 $(FLOOR_VENV)/bin/pytest --asyncio-debug -p no:cacheprovider $(SMOKE_TESTS)
	rm -rf $(FLOOR_VENV)

check: lint types test

## bench: the benchmark suite (about 8 minutes; BENCH_ARGS=--quick for about 2); see bench/README.md
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,fast,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## soak: readers and writers for 60 s while the listener, the pool and the database are killed;
##       lost outside the outage windows must be 0 (bench/soak.py --help; --quick: 20 s)
soak: install
	$(BIN)/python bench/soak.py $(if $(DURABLE),--durable)

## soak-durable: the soak with durable channels and SQL producers; lost must be 0 inside the
##               outage windows too (same as `make soak DURABLE=1`)
soak-durable: install
	$(BIN)/python bench/soak.py --durable

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
