# queuectl: one file, standard library only. These targets are for developers.
#
# The product needs nothing but Python. The test and lint tools live in a
# git-ignored venv that `make test` / `make lint` create on first use, so a
# fresh machine needs only python3 (with its venv module) and network to PyPI.
#
# PYTHON picks the interpreter: `make test PYTHON=python3.10` (or a path).
# Each Python minor version gets its own venv, .venv/3.10, .venv/3.11, ...,
# so switching between them does not rebuild or clobber the others.
PYTHON ?= python3

PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV := .venv/$(PYVER)
VPY := $(VENV)/bin/python

# The tools, pinned so every developer and CI run the same versions.
# All of them support Python 3.10 to 3.13.
# psycopg is for the PostgreSQL half of the suite; the product needs it only
# for a postgresql:// --db. Playwright drives the dashboard's browser tests in
# the machine's own Chromium (it never downloads a browser; without Chromium
# those tests skip). prometheus_client's parser reads the dashboard's /metrics in
# the tests (the product writes the text format itself).
TOOLS := pytest==9.2.0 pytest-xdist==3.8.0 ruff==0.17.6 vermin==1.9.2 "psycopg[binary]==3.3.9" \
	playwright==1.64.1 prometheus_client==0.26.0

# The stamp is touched only after pip succeeded, so an interrupted setup is
# retried; it depends on the Makefile, so changing a pin above updates the
# venv on the next run. (The venv's python itself can't be the target: it is a
# symlink to an old interpreter binary, so make would always see it as stale.)
STAMP := $(VENV)/.installed

.PHONY: test lint venv demo bench bench-large

# The suite on SQLite; then, if QUEUECTL_TEST_PG names a PostgreSQL database
# (postgresql://USER:PASSWORD@HOST/DB, a role that may create schemas), the
# same suite again on it.
test: $(STAMP)  ## the whole suite (about a minute on 2 cores, two with PostgreSQL)
	QUEUECTL_TEST_PG= $(VPY) -m pytest -q -n 4 test_queuectl.py
	@if [ -n "$$QUEUECTL_TEST_PG" ]; then \
		echo "--- the same suite on PostgreSQL ---"; \
		$(VPY) -m pytest -q -n 4 test_queuectl.py; \
	else \
		echo "PostgreSQL half skipped: set QUEUECTL_TEST_PG=postgresql://USER:PASSWORD@HOST/DB to run it too (README: Tests)"; \
	fi

lint: $(STAMP)  ## ruff, and vermin to keep the product runnable on Python 3.10
	$(VPY) -m ruff check --isolated --target-version py310 queuectl.py test_queuectl.py
	$(VENV)/bin/vermin -t=3.10- --violations --no-tips queuectl.py

venv: $(STAMP)  ## only set up the tools

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(TOOLS)
	touch $@

# These need no venv: the product is stdlib-only.
demo:
	$(PYTHON) queuectl.py demo

# PG=postgresql://USER:PASSWORD@HOST/DB adds the PostgreSQL rows: `make bench PG=...`
# (in the tools' venv then, for psycopg).
bench: $(if $(PG),$(STAMP))
	$(if $(PG),$(VPY),$(PYTHON)) queuectl.py bench $(if $(PG),--pg "$(PG)")

bench-large:
	$(PYTHON) queuectl.py bench --large
