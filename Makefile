# vaekl: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install the package with its dev extra if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Test files are spread over TEST_WORKERS processes (pytest-xdist, one file per worker at a
# time); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The unit tests only: no training runs, launchers, subprocesses or Slurm.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests -m "not slow"

demo: $(STAMP)
	$(PY) -m launch.sweep --config=experiments/configs/digits_mlp.py --backend=vmap --workdir=runs/demo
	$(PY) -m experiments.report --workdir=runs/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_kl.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_regularizers.py
	$(PY) benchmarks/bench_disentanglement.py --skip-gbt

clean:
	rm -rf $(VENV) runs
