# Lens: one command to set up and run the main job, one to set up and run the tests.
#   make demo    create .venv, install Lens, run the main job end to end on embedded defaults (lens demo)
#   make test    create .venv, install Lens with its dev extras, run the test suite
#   make bench   run the benchmarks under scripts/ (JSON summaries on stdout, files in benchmarks/)
#   make image   build the CPU and GPU container images (REGISTRY=ghcr.io/your-org; see Dockerfile)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lens-installed

.PHONY: setup demo test bench image clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lens demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench_all.py

REGISTRY ?= ghcr.io/your-org
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	docker build -t $(REGISTRY)/lens:$(VERSION)-cpu .
	docker build -t $(REGISTRY)/lens:$(VERSION)-gpu --build-arg DEVICE=gpu .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
