# Two commands set everything up on a fresh machine:
#   make run    creates .venv (torch 2.13.0 CPU wheel first), installs sparsefl, runs the default experiment
#   make test   same setup, then the import-layer contracts and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/default

.PHONY: setup run test test-slow lint data bench-quick bench-paper bench-dst bench-kd bench-gpu bench-codec clean

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

bench-dst: setup data
	$(VENV)/bin/sparsefl bench --suite dst --out bench-dst --jobs 2

# the kd suite's dense teachers first (its description says why), then the suite
bench-kd: setup data
	for m in resnet34 resnet50; do $(VENV)/bin/sparsefl run --set data.name=fashion-mnist \
	  --set model.name=$$m --set model.width=0.25 --set federation.num_clients=1 \
	  --set federation.clients_per_round=1 --set federation.rounds=10 --set federation.eval_every=5 \
	  --set local.steps=100 --set local.batch_size=64 --set local.lr=0.05 --set local.lr_end=0.005 \
	  --out kd-teachers/$$m || exit 1; done
	$(VENV)/bin/sparsefl bench --suite kd --out bench-kd --jobs 2

# on a CUDA machine (docs/gpu.md); --quick runs anywhere in under a minute
bench-gpu: setup
	$(PY) benchmarks/gpu.py --json bench-gpu.json

bench-codec: setup
	$(PY) benchmarks/codec.py --fuzz 100000 --jobs 2

clean:
	rm -rf $(VENV) runs
