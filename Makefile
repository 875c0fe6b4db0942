# queuectl: one file, standard library only. These targets are for developers.
PYTHON ?= python3

.PHONY: test lint demo bench bench-large

test:  ## the whole suite (about a minute on 2 cores)
	$(PYTHON) -m pytest -q -n 4 test_queuectl.py

lint:  ## ruff, and vermin to keep the product runnable on Python 3.10
	$(PYTHON) -m ruff check --isolated queuectl.py test_queuectl.py
	vermin -t=3.10- --violations --no-tips queuectl.py

demo:
	$(PYTHON) queuectl.py demo

bench:
	$(PYTHON) queuectl.py bench

bench-large:
	$(PYTHON) queuectl.py bench --large
