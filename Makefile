# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BANPICK := $(VENV)/bin/banpick
STAMP := $(VENV)/.installed
OUT ?= build/demo

.PHONY: setup demo test test-engines demo-model bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[calibrate,test,report,scale]'
	touch $(STAMP)

demo: setup
	bash tools/demo.sh $(BANPICK) $(OUT)

test: setup
	$(PY) -m pytest

# tests/engines/ against real vLLM and SGLang from PyPI, one cached virtualenv each under .cache/engines/
# (several GB the first time). VLLM_VERSION= / SGLANG_VERSION= (empty skips one); not part of `make test`.
test-engines:
	bash tools/engines/run.sh

demo-model: setup
	$(PY) tools/train_demo.py

bench: setup
	$(PY) bench/bench_profile.py

docs: setup
	$(PY) tools/gen_cli_docs.py > docs/cli.md

clean:
	rm -rf build
