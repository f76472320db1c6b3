# Two commands do all the set-up on a fresh machine:
#   make run   start chronoray with embedded defaults (local Ray, SQLite) on :8000
#   make test  install what the tests need, start throwaway PostgreSQL and
#              ZooKeeper, run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES_DIR ?= $(CURDIR)/.run/services
PYTEST_ARGS ?=

.PHONY: run test install system-deps sandbox-deps bench-deps services-start services-stop lint bench bench-http bench-million bench-run-burst bench-console bench-sandbox bench-history bench-statements bench-ray-calls chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# ZooKeeper and Java from Debian; PostgreSQL 15 binaries for throwaway clusters;
# Redis for the GCS fault-tolerance test; Chromium and its driver for the
# console's browser tests (Debian's: nothing downloads a browser).
system-deps:
	@need=""; \
	[ -f /usr/share/java/zookeeper.jar ] || need="$$need zookeeper"; \
	command -v java >/dev/null || need="$$need default-jre-headless"; \
	[ -x /usr/lib/postgresql/15/bin/initdb ] || need="$$need postgresql-15"; \
	command -v redis-server >/dev/null || need="$$need redis-server"; \
	[ -x /usr/bin/chromium ] || need="$$need chromium"; \
	[ -x /usr/bin/chromedriver ] || need="$$need chromium-driver"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need >/dev/null; \
	fi

# The egress network policy's packet filter (scripts kept off the control plane).
sandbox-deps:
	@if ! command -v iptables >/dev/null && [ ! -x /usr/sbin/iptables ]; then \
	  echo "installing: iptables"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq iptables >/dev/null; \
	fi

# The HTTP benchmark's load generator (wrk, from Debian's packages).
bench-deps:
	@if ! command -v wrk >/dev/null; then \
	  echo "installing: wrk"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; \
	fi

run: install sandbox-deps
	$(BIN)/chronoray up

test: install system-deps sandbox-deps lint
	@rm -rf $(SERVICES_DIR); mkdir -p $(SERVICES_DIR)
	@trap 'scripts/test-services.sh stop $(SERVICES_DIR)' EXIT; \
	scripts/test-services.sh start $(SERVICES_DIR) >/dev/null && \
	source $(SERVICES_DIR)/env && \
	$(BIN)/pytest $(PYTEST_ARGS)

# A recipe's prefix: throwaway PostgreSQL (fsync and synchronous_commit on),
# ZooKeeper and Redis for the rest of the line, stopped when it ends.
DURABLE_SERVICES = rm -rf $(SERVICES_DIR); mkdir -p $(SERVICES_DIR); \
	trap 'scripts/test-services.sh stop $(SERVICES_DIR)' EXIT; \
	CHRONORAY_DURABLE=1 scripts/test-services.sh start $(SERVICES_DIR) >/dev/null && \
	source $(SERVICES_DIR)/env

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install system-deps sandbox-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.fire_lag --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(BENCH_ARGS) && \
	$(BIN)/python -m bench.sandbox_start $(SANDBOX_BENCH_ARGS)

# What the sandbox's walls cost a script's start (each network policy, the
# cgroup) against today's launcher; also the last part of `make bench`.
bench-sandbox: install sandbox-deps
	$(BIN)/python -m bench.sandbox_start $(SANDBOX_BENCH_ARGS)

# Submission throughput through Ray Serve: POST /v1/tasks against /v1/tasks:batch.
bench-http: install system-deps sandbox-deps bench-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.submit_http --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(BENCH_ARGS)

# A million future tasks through /v1/tasks:batch and Client.submit_batch:
# accept rate, memory, list latency, a sample firing (bench/million.py).
bench-million: install system-deps sandbox-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.million --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(BENCH_ARGS)

# make run's memory in a burst of 10,000 (chronoray up: local Ray, SQLite).
bench-run-burst: install sandbox-deps
	$(BIN)/python -m bench.run_burst $(BENCH_ARGS)

# The console's pages over 100,000 tasks and 1,000 schedules: server time per page.
bench-console: install system-deps sandbox-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.console --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(BENCH_ARGS)

# A long history against the run path: the shards' and the API's queries with
# no finished rows and with 10 million (bench/history.py, ~15 minutes).
bench-history: install system-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.history --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(HISTORY_BENCH_ARGS)

# The run path's writes in-process (claim, start gate, result) against a bare
# keyed UPDATE, one task per call and 100 (bench/statements.py, ~2 minutes).
bench-statements: install system-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.statements --database-url "$$CHRONORAY_TEST_POSTGRES_URL" $(BENCH_ARGS)

# What one call between two actors costs (bench/ray_calls.py): no database.
bench-ray-calls: install
	$(BIN)/python -m bench.ray_calls $(BENCH_ARGS)

# The chaos harness (bench/chaos.py): all 12 scenarios on PostgreSQL with
# durable settings, ~30 minutes. CHAOS_ARGS="--only 1,4 --soak-s 60" for less.
chaos: install system-deps sandbox-deps
	@$(DURABLE_SERVICES) && \
	$(BIN)/python -m bench.chaos --services-dir $(SERVICES_DIR) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .run
