# The README's two commands: `make demo` (run the demo job) and `make test` (run every test).
# Each creates the virtualenv it needs on first use (the CPU build of torch, pinned in builder/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip --disable-pip-version-check install --progress-bar off
TINY := build/tiny-llama

.PHONY: demo test test-fast lint format validate clean

$(VENV)/.installed: builder/requirements.txt builder/requirements-cpu.txt builder/requirements-dev.txt pyproject.toml
	@echo "== setting up $(VENV) (first run only: about 2-4 minutes, most of it torch)"
	$(PYTHON) -m venv $(VENV)
	@echo "== torch, CPU build (builder/requirements-cpu.txt)"
	$(PIP_INSTALL) --no-deps -r builder/requirements-cpu.txt
	@echo "== the pinned dependencies (builder/requirements-dev.txt)"
	$(PIP_INSTALL) -r builder/requirements-dev.txt
	$(PIP_INSTALL) --quiet --no-deps --no-build-isolation -e .
	touch $@

$(TINY)/config.json: $(VENV)/.installed src/lora_worker/tools/tiny_model.py
	$(PY) -m lora_worker tiny-model --out $(TINY)

# The main job: a complete QLoRA job (NF4 on the CPU) on the shipped sample dataset, via the
# runpod SDK's local mode (handler.py reads test_input.json). A previous demo run is cleared
# first, since resubmitting a job id returns its stored result.
demo: $(TINY)/config.json
	rm -rf .volume/jobs/local_test
	@echo "== the demo job (about 2 minutes on 2 CPU cores); progress lines follow"
	VOLUME_DIR=.volume $(PY) -u handler.py

# Every test: ruff, then pytest (unit, CPU end-to-end jobs on the tiny model, loopback servers,
# PostgreSQL and headless Chromium when installed; .ci/run installs them). One line per test.
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -v

# The fast tier: everything but whole jobs on the tiny model.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not e2e"

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .

validate: $(VENV)/.installed
	$(PY) -m lora_worker validate examples/brightrun-sample-24.json

clean:
	rm -rf $(VENV) build .volume .pytest_cache .ruff_cache
