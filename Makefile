# Every target creates the virtual environment first when it is missing, so a
# fresh clone needs nothing else. Re-running is cheap: the stamp file records
# that the pinned set in requirements.txt is installed.
#   make train ARGS="train.epochs=2 run.name=try"   overrides for the training run
#   make gpu-check PY=python3                         any Python that already has torch (installs nothing)
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# The oldest torch the suite runs on (setup.cfg's floor), in an environment of its own.
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TORCH ?= torch==2.11.0 torchvision==0.26.0

.PHONY: install test test-compat train bench ablations gpu-check summary clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

# The multi-process core of the suite on the oldest supported torch.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -m pytest -q $(COMPAT_TESTS)

COMPAT_TESTS ?= tests/test_parity.py tests/test_trainer.py tests/test_scale.py tests/test_config.py

$(COMPAT_STAMP): requirements.txt setup.cfg
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet $(COMPAT_TORCH)
	grep -vE '^(torch|torchvision)==' requirements.txt > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet -r $(COMPAT_VENV)/requirements.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(COMPAT_STAMP)

train: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 launch/train.py $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m alexnet_mp.bench --quick $(ARGS)

ablations: $(STAMP)
	$(VENV)/bin/python -m alexnet_mp.ablations $(ARGS)

# No dependency on the stamp: on a GPU machine PY may be a Python that already has everything.
gpu-check:
	$(PY) -m alexnet_mp.gpu_check $(ARGS)

summary: $(STAMP)
	$(VENV)/bin/python -m alexnet_mp.summary

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info
