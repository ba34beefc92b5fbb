# Two entry points for a fresh machine: `make demo` (the pipeline end to end, offline)
# and `make test`. Both install what they need into .venv/ first, once.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip<26.3"
	$(PY) -m pip install --quiet -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) workflows/synthetic.py --preset demo --output $(DEMO)/raw
	$(PY) workflows/etl.py --input $(DEMO)/raw --output $(DEMO)/etl

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(DEMO)
