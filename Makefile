# Two commands on a fresh machine with Python 3.11 and make: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed
DEMO   ?= data/demo

.PHONY: run test venv demo-data bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo-data: venv
	test -f $(DEMO)/synthetic_truth.csv || $(PY) -m training synth $(DEMO)

run: demo-data
	$(PY) -m training index $(DEMO)

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_cache.py

clean:
	rm -rf $(VENV) .pytest_cache
