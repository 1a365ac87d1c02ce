# One entry point for a fresh clone: `make demo` runs the main job, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev proto demo converse engine calibration test test-py312 lint format serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (CPU: ONNX Runtime). Re-runs when pyproject.toml or the contracts change.
$(STAMP): pyproject.toml setup.py $(wildcard proto/*/*/*.proto) | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

install: $(STAMP)

$(VENV)/.dev-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

dev: $(VENV)/.dev-installed

proto: | $(BIN)/python
	$(BIN)/python -m pip install -q grpcio-tools
	$(BIN)/python scripts/gen_protos.py

# The main job: answer the two example questions with the shipped model on CPU (engine built on first use).
demo: engine
	$(BIN)/qa-assistant --demo

# The conversational chain in one process: the example turns (typed, unanswerable, spoken) about the example
# passage, with a latency table per turn. A 2-core CPU takes 8-25 ms per question (by processor), so under the default 10 ms
# language-model budget (which is also the QA call's deadline) most turns would end in DEADLINE_EXCEEDED: the demo
# gives QA 1 s and lets the model abstain. `make converse CONVERSE_FLAGS=` runs it with the default budgets.
CONVERSE_FLAGS ?= --budgets qa=1s --allow-null
converse: engine
	$(BIN)/qa-assistant converse --turns-file examples/turns.txt -pf examples/passage.txt $(CONVERSE_FLAGS)

# Build (or find) the cached default CPU engine: INT8 from the calibration shipped with the model.
engine: install
	$(BIN)/qa-build --default

# Recalibrate the default INT8 engine after the shipped model changes (needs SQuAD train data).
SQUAD_TRAIN ?= ../shared/data/squad/train-v1.1.json.gz
MODEL_DIR := models/minilm-l6-squad
calibration: install
	rm -f $(MODEL_DIR)/calibration.json
	$(BIN)/qa-build -m $(MODEL_DIR) -o $$(mktemp -d)/engine --int8 --squad-json $(SQUAD_TRAIN) \
		--calib-num 100 --calib-path $(MODEL_DIR)/calibration.json

serve: install
	$(BIN)/qa-serve

test: dev
	$(MAKE) --no-print-directory test-py312
	$(BIN)/python -m pytest -q

# A stream's questions start as eager tasks on Python 3.12+ only (services/qa_service.py, start_task), as on the GPU
# hosts: the stream tests run again under a 3.12 interpreter where the machine has one (pyenv's on this image), in a
# venv of the runtime requirements with this checkout on the path.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
VENV312 ?= .venv312
STREAM_TESTS := tests/test_service_errors.py tests/test_service_shutdown.py tests/test_fairness.py tests/test_client.py

$(VENV312)/.installed: pyproject.toml scripts/runtime_requirements.py | $(STAMP)
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(BIN)/python scripts/runtime_requirements.py > $(VENV312)/requirements.txt
	$(VENV312)/bin/python -m pip install -q -r $(VENV312)/requirements.txt pytest pytest-asyncio
	touch $@

test-py312: dev
ifeq ($(PYTHON312),)
	@echo "test-py312: no Python 3.12 on this machine: the eager start of stream questions was not tested"
else
	$(MAKE) --no-print-directory $(VENV312)/.installed
	PYTHONPATH=$(CURDIR) $(VENV312)/bin/python -m pytest -q -p no:cacheprovider $(STREAM_TESTS)
endif

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/typecheck.py  # mypy over the namespace as it installs
	$(BIN)/python -c 'import sys, realtime_qa; from importlinter.cli import lint_imports; sys.exit(lint_imports())'

format: dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(VENV312) build qa assistant asr response *.egg-info
