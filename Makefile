# Two commands set everything up on a fresh machine:
#   make run    creates .venv (torch 2.13.0 CPU wheel first), installs sparsefl, runs the default experiment
#   make test   same setup, then the import-layer contracts and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/default

.PHONY: setup run test test-slow lint data bench-quick bench-paper bench-codec clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,flower]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/sparsefl run --out $(OUT)

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench-quick: setup
	$(VENV)/bin/sparsefl bench --suite quick --out bench-quick --jobs 2

# Fashion-MNIST from Debian's package (IDX files in /usr/share/datasets/fashion-mnist); needs root
data:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

bench-paper: setup data
	$(VENV)/bin/sparsefl bench --suite paper --out bench-paper --jobs 2

bench-codec: setup
	$(PY) benchmarks/codec.py --fuzz 100000 --jobs 2

clean:
	rm -rf $(VENV) runs
