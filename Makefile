# Two commands on a fresh machine with Python 3.11 and make: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed
DEMO   ?= data/demo
PORT   ?= 8501
HOST   ?= 127.0.0.1

.PHONY: run test venv demo-data demo browser-deps bench screenshots clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo-data: venv
	test -f $(DEMO)/synthetic_truth.csv || $(PY) -m training synth $(DEMO)

# The dashboard, bound to localhost; the synthetic demo dataset is its embedded default.
run: demo-data
	CNMC_DEMO_DATA=$(DEMO) $(PY) -m streamlit run streamlit_app.py --server.address $(HOST) --server.port $(PORT)

# The command-line demo: train Solution A on the synthetic cells and report its test accuracy.
demo: demo-data
	$(PY) -m training demo --data $(DEMO)

# Debian's Chromium for the real-browser test (Playwright drives it; no browser is ever downloaded).
browser-deps:
	test -x /usr/bin/chromium || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

test: venv browser-deps
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_predict.py
	$(PY) benchmarks/bench_dashboard.py

# The README's screenshots (docs/images/*.png) from the running app in headless Chromium: generated cells and a
# generated smear field only, a demo run trained on generated cells (a few minutes on 2 cores; not part of `test`).
screenshots: venv browser-deps
	$(PY) tools/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache
