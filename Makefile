# make test   - create .venv, install everything, run the whole suite
# make render STACK=prod - preview a stack offline, manifests into build/<stack>/
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STACK  ?= dev

.PHONY: venv test render config-reference clean

$(VENV)/.installed: requirements.txt requirements-dev.txt server/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

render: venv
	$(PY) -m tools.render --stack $(STACK) --out build/$(STACK)

config-reference: venv
	$(PY) -m tools.config_reference --write README.md

clean:
	rm -rf build .pytest_cache
