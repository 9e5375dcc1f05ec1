# The README's two commands: `make demo` (run the demo job) and `make test` (run every test).
# Each creates the virtualenv it needs on first use (CPU build of torch, pinned in builder/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TINY := build/tiny-llama

.PHONY: demo test lint format validate clean

$(VENV)/.installed: builder/requirements.txt builder/requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r builder/requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(TINY)/config.json: $(VENV)/.installed src/lora_worker/tiny_model.py
	$(PY) -m lora_worker tiny-model --out $(TINY)

# The main job: a complete QLoRA job (NF4 on the CPU) on the shipped sample dataset, via the
# runpod SDK's local mode (handler.py reads test_input.json). A previous demo run is cleared
# first, since resubmitting a job id resumes it.
demo: $(TINY)/config.json
	rm -rf .volume/jobs/local_test
	VOLUME_DIR=.volume $(PY) -u handler.py

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff format .

validate: $(VENV)/.installed
	$(PY) -m lora_worker validate examples/brightrun-sample-24.json

clean:
	rm -rf $(VENV) build .volume .pytest_cache .ruff_cache
