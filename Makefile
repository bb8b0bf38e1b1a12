# Every target creates the virtual environment first when it is missing, so a
# fresh clone needs nothing else. Re-running is cheap: the stamp file records
# that the pinned set in requirements.txt is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test train bench summary clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

train: $(STAMP)
	$(VENV)/bin/torchrun --nproc_per_node=2 launch/train.py

bench: $(STAMP)
	$(PY) benchmarks/bench.py --quick
	$(PY) benchmarks/profiler_overhead.py

summary: $(STAMP)
	$(PY) -m alexnet_mp.summary

clean:
	rm -rf $(VENV) *.egg-info
