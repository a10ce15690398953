# soho_scale: the commands a new user needs. `make demo` and `make test` do all set-up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system test test-fast demo ablation lint format ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# System packages the tests use: a real Slurm (slurmctld, slurmd, munged) for the scheduler
# tests. Installed when run as root with apt-get; elsewhere those tests skip and say why.
SYSTEM_TOOLS := slurmctld slurmd munged sbatch
system:
	@missing=0; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ $$missing = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge) \
	    || echo "note: installing slurm-wlm/munge failed: the real-Slurm tests will skip"; \
	elif [ $$missing = 1 ]; then \
	  echo "note: slurm-wlm/munge missing and not root: the real-Slurm tests will skip"; \
	fi

test: setup system
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" tests

demo: setup
	$(BIN)/python -m soho_scale.demo

# The demo's ablation (jobs/sweeps/demo_ablation.yaml): hours on 2 cores; a re-run skips what
# finished. ONLY="base from_scratch no_vd" runs those variants.
ablation: setup
	$(BIN)/python -m soho_scale.demo --sweep jobs/sweeps/demo_ablation.yaml $(if $(ONLY),--only $(ONLY))

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
