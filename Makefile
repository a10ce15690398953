# soho_scale: the commands a new user needs. `make demo` and `make test` do all set-up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint format ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" tests

demo: setup
	$(BIN)/python -m soho_scale.demo

lint: setup
	$(BIN)/ruff check soho_scale data_pipeline tests benchmarks
	$(BIN)/ruff format --check soho_scale data_pipeline tests benchmarks

format: setup
	$(BIN)/ruff format soho_scale data_pipeline tests benchmarks
	$(BIN)/ruff check --fix soho_scale data_pipeline tests benchmarks

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs demo_out .pytest_cache .ruff_cache
