# Two commands on a fresh machine with Python 3.11 (each creates or reuses .venv from the lock on its own):
#   make demo    install, then `dvc repro`: the whole pipeline on the demo profile (tiny model, offline, CPU)
#   make test    install, then the test suite
# and:
#   make install       only the environment (.venv: requirements.txt installed --no-deps, this project editable)
#   make install-gpu CUDA=cu126   the same from requirements-gpu.txt: paddlepaddle-gpu from PaddlePaddle's CUDA
#                                 index (cu118 | cu126 | cu129), plus the NVIDIA runtime wheels it declares
# The lock is complete (every package pinned), hence --no-deps: nothing outside it is resolved or downloaded.
PYTHON ?= python3
VENV ?= .venv
# the lock this environment was made from (.venv/.lock), so `make test` on a GPU machine keeps the GPU build
LOCK ?= $(shell cat $(VENV)/.lock 2>/dev/null || echo requirements.txt)
BIN := $(VENV)/bin
# the environment is (re)installed when the lock or pyproject.toml changes
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)

.PHONY: demo test install install-gpu
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo; echo "Done. dvc and ernie-dpo live in $(VENV): enter it before the README's other commands:"
	@echo "    source $(VENV)/bin/activate"

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest tests

install: $(STAMP)
	@echo "Environment ready. Enter it with:  source $(VENV)/bin/activate"

CUDA ?= cu126
PADDLE_INDEX := https://www.paddlepaddle.org.cn/packages/stable/$(CUDA)/
# the NVIDIA runtime wheels paddlepaddle-gpu pulls in, pinned per CUDA build (empty: let pip choose, then recorded)
NVIDIA_PINS ?= requirements-nvidia/$(CUDA).txt
install-gpu:
	test ! -x $(BIN)/python || $(BIN)/python -m pip uninstall -y -q paddlepaddle  # both would provide `paddle`
	$(MAKE) install LOCK=requirements-gpu.txt PIP_EXTRA_INDEX_URL=$(PADDLE_INDEX)
	$(BIN)/python -m pip install -q paddlepaddle-gpu==3.3.1 --extra-index-url $(PADDLE_INDEX) $(if $(NVIDIA_PINS),-c $(NVIDIA_PINS))
	$(BIN)/python -m pip freeze --exclude-editable > requirements-gpu.freeze.txt
	$(BIN)/python -c 'import paddle; paddle.utils.run_check()'

$(STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is needed, this is " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	echo $(LOCK) > $(VENV)/.lock
	touch $@

# SkyPilot in its own environment, .venv-sky (`make sky-venv`, ≈ 460 MB): skypilot 0.14.1 pins click<8.2 and
# bcrypt==4.0.1, which conflict with this project's lock (pip then silently falls back to an ancient skypilot), so it
# never goes into .venv. It launches sky/experiment.yaml (`.venv-sky/bin/sky jobs launch ...`, docs/scaling.md) and
# tests/test_sky.py validates that file with it, offline. Its lock is requirements-sky.txt (complete, --no-deps). The folder ignores itself (.gitignore `*` inside).
SKY_VENV ?= .venv-sky
.PHONY: sky-venv
SKY_STAMP := $(SKY_VENV)/.installed-$(shell sha256sum requirements-sky.txt | cut -c1-16)
sky-venv: $(SKY_STAMP)

$(SKY_STAMP):
	test -x $(SKY_VENV)/bin/python || $(PYTHON) -m venv $(SKY_VENV)
	echo '*' > $(SKY_VENV)/.gitignore
	$(SKY_VENV)/bin/python -m pip install -q --no-deps -r requirements-sky.txt
	rm -f $(SKY_VENV)/.installed-*
	touch $@
