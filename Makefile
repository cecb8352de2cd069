# The two set-up commands of README.md: `make up` (a local 3-server cluster) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SERVERS ?= 3
MODE ?= active_active

.PHONY: install up test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/ferrylink precompile  # the services' docstring-free library caches
	touch $@

up: install
	$(VENV)/bin/ferrylink up --servers $(SERVERS) --mode $(MODE)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy -p ferrylink -p ferrylink_ops -p services -p tests -p bench

test: lint
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --durations=20

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .ferrylink .pytest_cache .mypy_cache .ruff_cache
