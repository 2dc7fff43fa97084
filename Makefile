# Two commands, each sets itself up on first use (a virtual environment in .venv):
#   make reproduce   execute every notebook in the default profile, regenerate figures/ (~15 min, 2 cores)
#   make test        run the test suite (unit tests + the notebooks in the smoke profile)
# Other targets: make setup, make smoke (the whole pipeline in the smoke profile), make lab, make clean.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu

.PHONY: setup test reproduce smoke lab clean

setup: $(VENV)/.installed

# torch and torchvision are resolved together from the registry (see README: never the local
# torch==2.13.0 CPU wheel, which the registry's torchvision cannot load).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest

reproduce: setup
	$(VENV)/bin/cam2mask reproduce --profile $(PROFILE)

smoke: setup
	$(VENV)/bin/cam2mask reproduce --profile smoke

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf artifacts/smoke .pytest_cache
