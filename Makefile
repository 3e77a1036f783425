# Two entry points, both self-installing into .venv/ (see README).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test serve plan-demo

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# Start the daemon (embedded SmolLM2, 2 prefill + 1 decode Ray actors on 127.0.0.1), send one
# chat request over HTTP, print the answer and its chunk plan, stop.
demo: $(STAMP)
	$(VENV)/bin/tetris serve --demo --port 8000

# The daemon, until Ctrl-C.
serve: $(STAMP)
	$(VENV)/bin/tetris serve

plan-demo: $(STAMP)
	$(VENV)/bin/tetris plan --model llama3-8b --hardware h100 --prefill-instances 8 \
		--availability 0,0,0,3,3,3,3,3 --request 131072 --request 8192@0.5 \
		--solver cp --gantt tetris-plan.png

test: $(STAMP)
	$(VENV)/bin/ruff check tetris tests benchmarks
	$(VENV)/bin/mypy tetris
	$(VENV)/bin/python -m pytest
