# Two entry points for a fresh machine: `make demo` (the pipeline end to end, offline)
# and `make test`. Both install what they need into .venv/ first, once.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: venv demo test check-gpu-lock recbole-venv bench-recbole bench-quality clean

venv: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip<26.3"
	$(PY) -m pip install --quiet -r requirements/cpu.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# raw file -> workflow -> parquet -> loader -> model -> export -> server -> client
demo: $(STAMP)
	$(PY) workflows/synthetic.py --preset demo --output $(DEMO)/raw
	$(PY) workflows/etl.py --input $(DEMO)/raw --output $(DEMO)/etl
	$(PY) models/train_ncf.py --data $(DEMO)/etl --output $(DEMO)/run --force
	$(PY) serving/export.py --data $(DEMO)/etl --run $(DEMO)/run --output $(DEMO)/model-repository --overwrite
	$(PY) serving/client.py --serve $(DEMO)/model-repository --user 1 --top-k 10

test: $(STAMP)
	$(PY) -m pytest

# pip's resolver on requirements/gpu.lock against pypi.org, no GPU needed (~3.5 GB of downloads)
check-gpu-lock: $(STAMP)
	MERLIN_NCF_RESOLVE_GPU_LOCK=1 $(PY) -m pytest tests/test_environment.py -k resolves -rs

# RecBole 1.2.1 in its own venv (it pins pandas 2, which Merlin 23.08 refuses).
recbole-venv: .venv-recbole/.installed

.venv-recbole/.installed: requirements/recbole.txt
	test -x .venv-recbole/bin/python || $(PYTHON) -m venv .venv-recbole
	.venv-recbole/bin/python -m pip install --quiet "pip<26.3" -r requirements/recbole.txt
	.venv-recbole/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .  # our metrics, not our deps
	touch $@

# RecBole's NeuMF trained on an ETL output's train positives, scored on its test lists.
bench-recbole: recbole-venv
	.venv-recbole/bin/python benchmarks/recbole_baseline.py --data $(DATA)

# One table of every model on the same lists: make bench-quality DATA=<etl dir> [OUT=<dir>]
bench-quality: $(STAMP) recbole-venv
	$(PY) benchmarks/quality.py --data $(DATA) $(if $(OUT),--output $(OUT))

clean:
	rm -rf $(DEMO)
