# vitlab: `make train` and `make test` are all a new user needs; each installs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install train test test-fast bench docs lint format clean

install: $(STAMP)  ## .venv with the package and its dev extra (a no-op when up to date)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install  ## the default demo: ViT on the bundled digits, CPU; ARGS="model=... data=..." to change it
	$(PY) src/train.py $(ARGS)

test: install  ## the whole suite, as CI runs it
	$(PY) -m pytest $(ARGS)

test-fast: install  ## skip the multi-process tests
	$(PY) -m pytest -m "not slow" $(ARGS)

bench: install  ## ViT-S/16 in Lightning fit vs a bare loop vs timm, 224, batch 32; ARGS="model=mixer_b16 ..." to change it
	$(PY) src/bench.py $(ARGS)

docs: install  ## these docs (docs/, mkdocs.yml) built into site/; strict: a broken link or a page missing from nav fails
	$(VENV)/bin/mkdocs build --strict

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: install
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

clean:  ## remove run folders, the built docs and caches (keeps .venv and data/)
	rm -rf logs outputs multirun site .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
