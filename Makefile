# The two quickstart commands are `make demo` and `make test`; everything else here serves them.
# Two environments from the same source tree:
#   .venv           the main one (newest torch that pip resolves, >= 2.6)
#   .venv-composer  the Composer one; `mosaicml` pins torch<2.7.1, so it cannot share .venv
# Each is rebuilt only when pyproject.toml or setup.py change, so a second `make test` reuses them.

PYTHON ?= python3
VENV := .venv
COMPOSER_VENV := .venv-composer
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: all venv composer-venv demo test test-main test-composer lint bench clean

all: test

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,lightgbm]"
	touch $@

$(COMPOSER_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(COMPOSER_VENV)
	$(COMPOSER_VENV)/bin/pip install --quiet --upgrade pip
	$(COMPOSER_VENV)/bin/pip install --quiet -e ".[dev,composer]"
	touch $@

venv: $(VENV)/.installed

composer-venv: $(COMPOSER_VENV)/.installed

demo: venv
	$(VENV)/bin/tikmix demo $(DEMO_ARGS)

test: test-main test-composer

test-main: venv
	$(VENV)/bin/python -m pytest -m "not composer" $(PYTEST_ARGS)

test-composer: composer-venv
	$(COMPOSER_VENV)/bin/python -m pytest -m composer $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(VENV)/bin/tikmix bench loader
	$(VENV)/bin/tikmix bench kernels
	$(VENV)/bin/python benchmarks/bench_solver.py
	$(VENV)/bin/python benchmarks/bench_influence.py --presets tiny small --curve

clean:
	rm -rf $(VENV) $(COMPOSER_VENV) build *.egg-info
