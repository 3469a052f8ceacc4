# Setup, main job and tests. Everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on machines that carry the local 2.13.0 CPU wheel this installs in seconds; elsewhere pip
# picks the platform default (a CUDA build on Linux). GPU users: `make setup TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),torch==2.13.0,torch>=2.4)
PYTEST_ARGS ?=

.PHONY: setup train test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Main job: train the reversible LM on the bundled corpus (CPU, minutes).
train: setup
	$(PY) training/train_lm.py $(TRAIN_ARGS)

# Full test suite (what CI runs).
test: setup
	$(PY) -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

# Everything but the slow (multi-process / training-run) tests.
test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
