# Two commands, each sets itself up on first use (a virtual environment in .venv):
#   make reproduce   execute every notebook in the default profile, regenerate figures/ (10-30 min on 2 cores)
#   make test        run the test suite (unit tests + the notebooks in the smoke profile)
# Other targets: make setup, make smoke (the whole pipeline in the smoke profile), make lab, make clean,
#   make lock (refresh requirements.lock: newest versions the registry allows, with hashes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu

.PHONY: setup test reproduce smoke lab clean lock

setup: $(VENV)/.installed

# Every dependency comes from requirements.lock: exact versions with their hashes, so that the
# committed tables are reproduced with the packages that made them (torch and torchvision are
# locked together; never the local torch==2.13.0 CPU wheel, which the registry's torchvision
# cannot load). The package itself is installed on top, without resolving anything again.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# uv resolves pyproject.toml's dependencies (with the test extra) for this Python on Linux x86-64;
# it runs from its own small environment so that .venv holds exactly the lock.
LOCK_PY = $(shell $(PYTHON) -c 'import platform; print(platform.python_version())')
lock:
	$(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet uv
	.lockenv/bin/uv pip compile pyproject.toml --extra test --generate-hashes --no-header \
		--python-version $(LOCK_PY) --python-platform x86_64-manylinux_2_28 $(LOCK_ARGS) \
		-o requirements.lock

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
