# make local  - 3 sim replicas behind a real nginx on 127.0.0.1:8080 (Ctrl-C stops)
# make test   - create .venv, install everything, run the whole suite
# make render STACK=prod - preview a stack offline, manifests into build/<stack>/
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STACK  ?= dev

.PHONY: venv test local local-down render config-reference bench bench-server clean

$(VENV)/.installed: requirements.txt requirements-dev.txt server/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

local: venv
	$(PY) -m local up

local-down: venv
	$(PY) -m local down

bench: venv
	$(PY) -m bench

bench-server: venv
	$(PY) -m server.bench

render: venv
	$(PY) -m tools.render --stack $(STACK) --out build/$(STACK)

config-reference: venv
	$(PY) -m tools.config_reference --write README.md

clean:
	rm -rf build .pytest_cache .local-run
