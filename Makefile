# Two commands matter on a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything on first use (about 2-3 minutes), then reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coolray-installed
export PYTHONPATH := $(CURDIR)
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true

.PHONY: setup demo test test-all bench serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# DeepSpeed builds its CPU shared-memory collective op on first use (~50 s); do it once here.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null
	touch $(STAMP)

demo: setup
	$(PY) jobs/demo.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "not gpu and not vllm" $(ARGS)

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

serve: setup
	$(PY) jobs/serve.py $(if $(MODEL),model.path=$(MODEL),) $(ARGS)

clean:
	rm -rf outputs wandb
