# Lens: one command to set up and run the main job, one to set up and run the tests.
#   make demo    create .venv, install Lens with the demo extra (local S3/SQS, sample photos), run the main job
#                end to end on embedded defaults (lens demo)
#   make test    create .venv, install Lens with every extra and the test tools, run the test suite
#   make bench   run the benchmarks under scripts/ (JSON summaries on stdout, files in benchmarks/)
#   make image   build the CPU and GPU container images (REGISTRY=ghcr.io/your-org; see Dockerfile)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lens-installed

.PHONY: setup demo test bench image clean

DEMO_STAMP := $(VENV)/.lens-demo-installed

# the tests: Lens with every extra and the test tools
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP) $(DEMO_STAMP)

# the demo: Lens with local S3/SQS (moto) and the sample photos, nothing else
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[demo]'
	touch $(DEMO_STAMP)

setup: $(STAMP)

demo: $(DEMO_STAMP)
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
