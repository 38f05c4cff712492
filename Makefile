# The two commands README.md starts with: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Side venvs the tests start servers from (DiracX, Galaxy, Keystone+Nova); built once and reused across runs.
SIDE_VENVS ?= $(shell $(PYTHON) -c "import sys; sys.path.insert(0, '.'); from tests.sidevenvs import KNOWN; print(' '.join(sorted(KNOWN)))")
PYTEST_ARGS ?=
# Marker expression for a slice, e.g. PYTEST_MARKS="not slow"; empty runs everything, the tool-compatibility suite
# (tests/runner/test_tool_compat.py, about 25 minutes on 2 cores) included. `make compat` runs that suite alone.
PYTEST_MARKS ?=

.PHONY: demo wms-demo test compat venv services lint bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[test,htcondor,openstack,arc]'
	touch $@

venv: $(VENV)/.installed

services:
	@bash scripts/ensure-services.sh

demo: venv
	$(PY) scripts/galaxy_demo.py

# The scheduler and pilots alone (no Galaxy): a multi-step job chain whose data moves through sandboxes.
wms-demo: venv
	$(PY) scripts/wms_demo.py

test: venv services
	$(PY) -m tests.sidevenvs $(SIDE_VENVS)
	$(VENV)/bin/ruff check galaxy_dirac sitedirector tests benchmarks scripts
	$(PY) -m pytest -ra --timeout 900 -m "$(PYTEST_MARKS)" $(PYTEST_ARGS) tests

compat: venv services
	$(PY) -m tests.sidevenvs galaxy
	$(PY) -m pytest -ra -s -m compat $(PYTEST_ARGS) tests/runner/test_tool_compat.py

lint: venv
	$(VENV)/bin/ruff check galaxy_dirac sitedirector tests benchmarks scripts

bench: venv services
	$(PY) benchmarks/wms.py

clean:
	rm -rf $(VENV) var
