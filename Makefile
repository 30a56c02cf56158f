# The two commands of the README:
#   make demo   trains the tiny preset locally (examples/tiny.yaml) with 2 CPU workers
#   make test   runs the whole test suite, building what it needs first
# Everything is installed by these targets; nothing on the machine is assumed but
# python3, go and a C compiler.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Caches that outlive a clone (Go builds, Kubernetes binaries) live under this folder;
# per-clone caches (torch extensions, torchrun logs) live under .cache/ in the repo.
BLOOMRUN_HOME ?= $(HOME)/.cache/bloomrun
export BLOOMRUN_HOME
export BLOOMRUN_CACHE := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR := $(BLOOMRUN_CACHE)/torch_extensions
export TRITON_CACHE_DIR := $(BLOOMRUN_CACHE)/triton
PYTEST_ARGS ?=

# Each area adds its targets and appends to TEST_DEPS in its own mk/*.mk file.
TEST_DEPS := venv

.PHONY: all demo test venv
all: test

include $(sort $(wildcard mk/*.mk))

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard requirements/*.txt)
	bash scripts/install_venv.sh $(PYTHON) $(VENV)
	touch $@

demo: venv
	$(VENV)/bin/bloomctl run examples/tiny.yaml

test: $(TEST_DEPS)
	$(PY) -m pytest $(PYTEST_ARGS)
