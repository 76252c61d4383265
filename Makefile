# Two commands: `make demo` and `make test`. Both create .venv and install the project if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# 8 simulated CPU devices: every sharded path runs on a laptop or CI box
SIM8   := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTEST_ARGS ?=
# two workers (one per core of the CI machine), a test file per worker at a time, slowest files first (conftest)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(SIM8) $(VENV)/bin/hallojax demo

test: $(STAMP)
	$(SIM8) HALLOJAX_JAX_CACHE=$(CURDIR)/.cache/jax $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
