# diffkit: the executable book on diffusion models.
#
#   make book         build the book (executes every chapter) -> _build/html/index.html
#   make test         unit + parity tests, the book (executing every chapter once), the book in headless Chromium
#   make test-notebooks  every chapter under nbval (not part of make test: the book build executes them)
#   make checkpoints  retrain every shipped checkpoint (python -m diffkit.train --all)
#   make serve        serve _build/html on http://localhost:$(PORT)
#   make clean        remove build outputs (keeps .venv and checkpoints/)
#
# `make book` and `make test` create .venv (python3 -m venv) and install requirements.txt plus
# `pip install -e .` when it is missing or older than requirements.txt / pyproject.toml.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := book
.DELETE_ON_ERROR:

PYTHON ?= python3
PORT ?= 8000
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Everything runs offline: nothing is downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# Notebook kernels (book, nbval) need ipykernel's inline matplotlib backend: a MPLBACKEND from the
# caller's environment (e.g. Agg) would silently drop every figure from the book.
unexport MPLBACKEND
# Make the venv's python/jupyter the ones found first (also by the notebook kernels).
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

# make stops on any non-zero exit, including pytest's 5 ("no tests collected"): an empty test
# run fails instead of passing silently.
PYTEST := $(BIN)/pytest
NBVAL_FLAGS := --nbval-lax --nbval-cell-timeout=1200 -p no:cacheprovider

.PHONY: book test test-unit test-notebooks test-browser checkpoints serve clean venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if [ ! -x "$(BIN)/python" ]; then \
	  echo ">>> creating $(VENV) with $(PYTHON)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e .
	@touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@test -f _build/html/index.html
	@echo ">>> book: $(CURDIR)/_build/html/index.html"

# Agg only for the plain pytest run (no display, no inline backend there).
test-unit: $(STAMP)
	MPLBACKEND=Agg $(PYTEST) tests/ --ignore=tests/test_book_browser.py

test-notebooks: $(STAMP)
	$(PYTEST) $(NBVAL_FLAGS) chapters/

test-browser: $(STAMP)
	$(PYTEST) tests/test_book_browser.py

# Sequential on purpose (also under make -j): each stage must pass before the next starts, and
# each prints how long it took. Every notebook is executed once, by the book build: it runs each
# chapter from scratch and stops at the first failing cell (raise_on_error in _config.yml), which
# is what `test-notebooks` (nbval) checks too, so running both would execute every chapter twice.
test: $(STAMP)
	@s=$$SECONDS; $(MAKE) --no-print-directory test-unit; \
	  echo ">>> [time] unit + parity tests: $$((SECONDS - s)) s"
	@s=$$SECONDS; $(MAKE) --no-print-directory book; \
	  echo ">>> [time] make book (executes every chapter once): $$((SECONDS - s)) s"
	@s=$$SECONDS; $(MAKE) --no-print-directory test-browser; \
	  echo ">>> [time] rendered book in Chromium: $$((SECONDS - s)) s"

checkpoints: $(STAMP)
	$(BIN)/python -m diffkit.train --all

serve:
	@test -f _build/html/index.html || { echo "no _build/html/index.html: run 'make book' first" >&2; exit 1; }
	@echo ">>> serving http://localhost:$(PORT)/ (Ctrl-C to stop)"
	cd _build/html && $(PYTHON) -m http.server $(PORT) --bind 127.0.0.1

clean:
	rm -rf _build .pytest_cache .jupyter_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
	  | xargs -0 rm -rf
