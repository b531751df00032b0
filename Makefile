# make local  - 3 sim replicas behind a real nginx on 127.0.0.1:8080 (Ctrl-C stops);
#               its own light .venv-local (requirements-local.txt); options: ARGS="--port 9090"
# make test   - create .venv, install everything, run the whole suite
# make render STACK=prod - preview a stack offline, manifests into build/<stack>/
VENV   ?= .venv
LOCAL_VENV ?= .venv-local
PYTHON ?= python3
PY     := $(VENV)/bin/python
LOCAL_PY := $(LOCAL_VENV)/bin/python
STACK  ?= dev
ARGS   ?=

.PHONY: venv venv-local test local local-down render config-reference bench bench-server clean

$(VENV)/.installed: requirements.txt requirements-dev.txt server/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Local mode (sim engine) alone: no Pulumi, torch or transformers, so seconds to install. Its
# own folder, so it and the full .venv never overwrite each other.
$(LOCAL_VENV)/.installed: requirements-local.txt
	$(PYTHON) -m venv $(LOCAL_VENV)
	$(LOCAL_PY) -m pip install --quiet --disable-pip-version-check -r requirements-local.txt
	touch $@

venv-local: $(LOCAL_VENV)/.installed

test: venv
	$(PY) -m pytest

local: venv-local
	$(LOCAL_PY) -m local up $(ARGS)

local-down: venv-local
	$(LOCAL_PY) -m local down $(ARGS)

bench: venv
	$(PY) -m bench $(ARGS)

bench-server: venv
	$(PY) -m server.bench $(ARGS)

render: venv
	$(PY) -m tools.render --stack $(STACK) --out build/$(STACK)

config-reference: venv
	$(PY) -m tools.config_reference --write README.md

clean:
	rm -rf build .pytest_cache .local-run
