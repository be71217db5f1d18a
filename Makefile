# make test: everything a fresh clone needs (venv, Node packages, frontend bundle), then all tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUNDLE := nbexplain/static/widget.js

.PHONY: test test-py test-js demo bench clean

test: $(STAMP) $(BUNDLE)
	npm test
	$(PY) -m pytest -q

test-py: $(STAMP) $(BUNDLE)
	$(PY) -m pytest -q -m "not browser"

test-js: node_modules
	npm test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, as a matching pair (the default index would pick a mismatched one)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

node_modules: package.json package-lock.json
	# npm 11 `npm ci` rejects this lock (rollup platform binaries are listed but not locked);
	# `npm install` follows the lock for everything that is in it
	npm install --no-audit --no-fund
	touch $@

$(BUNDLE): node_modules $(wildcard js/*.js) js/widget.css
	npm run build

demo: $(STAMP) $(BUNDLE)
	$(PY) -m nbexplain.demo

bench: $(STAMP) $(BUNDLE)
	$(PY) benchmarks/run.py
	# slider -> redrawn canvas per control, in JupyterLab and Notebook 7: bench-results/latency.json
	NBX_E2E_ARTIFACTS=bench-results $(PY) -m pytest -q tests/test_browser.py -k "slider or select or view_controls"

clean:
	rm -rf $(VENV) node_modules nbexplain/static
