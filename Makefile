# Two commands do all set-up on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BANPICK := $(VENV)/bin/banpick
STAMP := $(VENV)/.installed
OUT ?= build/demo
# Set-up prints nothing but errors: no progress bars, no pip version nag.
PIP := $(PY) -m pip install --quiet --quiet --progress-bar off --disable-pip-version-check

.PHONY: setup demo test test-engines demo-model bench docs wheel clean

# Set-up runs once: the stamp file marks a finished install, so a second `make demo` goes straight to the
# pipeline (it reinstalls only when pyproject.toml changes). An interrupted set-up leaves no stamp and reruns.
setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "set-up: $(VENV) with torch 2.13.0 (CPU) and banpick (once; later runs reuse it)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) torch==2.13.0
	@$(PIP) -e '.[calibrate,test,report,scale]'
	@touch $(STAMP)

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

# banpick's wheel (with the demo model and data inside) in dist/: `pip install dist/banpick-*.whl`.
# No index holds banpick yet; this is how to install it elsewhere (README.md, "Install").
wheel:
	rm -rf dist
	$(PYTHON) -m pip wheel --no-deps --quiet --disable-pip-version-check --wheel-dir dist .
	@ls dist/banpick-*.whl

clean:
	rm -rf build dist
