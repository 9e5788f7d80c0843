# Lens: one command to set up and run the main job, one to set up and run the tests.
#   make demo    create .venv, install Lens with the demo extra (local S3/SQS, sample photos), run the main job
#                end to end on embedded defaults (lens demo)
#   make test    create .venv, install Lens with every extra and the test tools (and Debian's chromium for the
#                search page's browser test, with apt-get, as root or through sudo), build the manual
#                (mkdocs build --strict), run the test suite
#   make bench   run the benchmarks under scripts/ (JSON summaries on stdout, files in benchmarks/)
#   make image   build the CPU and GPU container images (REGISTRY=ghcr.io/your-org; see Dockerfile)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lens-installed

.PHONY: gpu-check setup demo test bench image clean

DEMO_STAMP := $(VENV)/.lens-demo-installed

# the tests: Lens with every extra and the test tools
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall -y -q lens 2>/dev/null || true  # the distribution's name before 0.1.0's rename
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP) $(DEMO_STAMP)

# the demo: Lens with local S3/SQS (moto) and the sample photos, nothing else
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[demo]'
	touch $(DEMO_STAMP)

# the search page's test drives a real headless Chromium: Debian's package (browser downloads fail offline)
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium at $(CHROMIUM) (or set CHROMIUM=path)"; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

setup: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/lens demo

test: $(STAMP) $(CHROMIUM)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q   # the manual (docs/): no broken link, anchor or snippet
	LENS_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q --durations=25  # the slowest tests, for the suite-time budget

bench: $(STAMP)
	$(BIN)/python scripts/bench_all.py

# on a machine with one NVIDIA GPU: install, then every GPU path checked and measured within 8 minutes, one JSON
gpu-check:
	scripts/gpu_check.sh

REGISTRY ?= ghcr.io/your-org
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image:
	docker build -t $(REGISTRY)/lens:$(VERSION)-cpu .
	docker build -t $(REGISTRY)/lens:$(VERSION)-gpu --build-arg DEVICE=gpu .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
