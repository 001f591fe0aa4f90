# mmcache: every target sets up .venv on first use (a stamp file makes later calls instant).
#
#   make demo                      generate demo data, extract features, train heads, print a table
#   make test                      the full test suite
#   make features DATASET=mvsa     extract the dataset's default features into cache/<dataset>/
#   make train DATASET=mvsa VTYPE=clip TTYPE=clip D=256
#   make sweep DATASET=mvsa GRID='head=linear,gated;D=128,256'
#   make ablations DATASET=mvsa    encoder pairs x D x lr (the MVSA reference table)
#   make ablate-modality DATASET=mvsa   image only / text only / both
#   make compare-heads DATASET=mvsa     linear / gated / hateclipper / xattn / scabg / transformer
#   make bench                     every benchmark; writes bench/results.json and bench/results.md
#   make bench-quick               the headline ratios at small sizes; fails below a floor (CI runs it)
#   make docs                      build the documentation site into site/ (mkdocs --strict, offline)
#
# TORCH_SPEC picks the torch/torchvision pair installed into .venv. Default: the normal
# PyPI wheels (CUDA builds) where an NVIDIA GPU is present; on a CPU-only x86_64 machine
# the pinned pair below (the only pair that imports beside the CPU wheel on such hosts);
# on aarch64 a CPU pair. Override: make setup TORCH_SPEC='torch==2.5.1 torchvision==0.20.1'

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mmcache-installed
EXTRAS ?= dev,lora,video,track,stream,docs

ARCH   := $(shell uname -m)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch torchvision
else ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

DATASET ?= demo
DATA_DIR ?= data/$(DATASET)
CACHE_DIR ?= cache
VTYPE ?= clip
TTYPE ?= clip
D ?= 256
HEAD ?= linear
GRID ?= head=linear,gated;D=128,256
THREADS ?=
SEEDS ?= 0,1,2
EXTRACT_ARGS ?=
TRAIN_ARGS ?=
BENCH_ARGS ?=

# Default features per dataset (store name=preset where the name differs from the preset).
FEATURES_demo          := --image clip=clip-tiny --text clip=clip-tiny
FEATURES_mvsa          := --image clip,resnet --text clip,roberta
FEATURES_mvsa-single   := $(FEATURES_mvsa)
FEATURES_mvsa-multiple := $(FEATURES_mvsa)
FEATURES_hateful-memes := --image clip,clip-l14 --text clip,clip-l14,roberta
FEATURES_twitter15     := --image clip,resnet,frcnn --text clip,roberta --teacher nli-teacher
FEATURES_twitter17     := $(FEATURES_twitter15)
FEATURES_mmhs150k      := --image clip,resnet --text clip,roberta --context clip,roberta
FEATURES_fakeddit      := --image clip,resnet --text clip,roberta
FEATURES_meld          := --text roberta --video r3d --audio mel
FEATURES ?= $(or $(FEATURES_$(DATASET)),--image clip --text clip)

# torch CPU threads for training (empty: heads' default, one per 4 cores, 1 to 8).
THREAD_ARG := $(if $(THREADS),--threads $(THREADS),)
# Training epochs of the heads targets (empty: heads' default, 50).
EPOCHS ?=
EPOCH_ARG := $(if $(EPOCHS),--epochs $(EPOCHS),)

# Reference studies: the stores each compares (override VSTORES / TSTORES / HEADS_GRID); a dataset whose
# default features are one store per modality compares only those.
VSTORES_DEFAULT := clip,resnet
TSTORES_DEFAULT := clip,roberta
VSTORES_demo := clip
TSTORES_demo := clip
VSTORES ?= $(or $(VSTORES_$(DATASET)),$(VSTORES_DEFAULT))
TSTORES ?= $(or $(TSTORES_$(DATASET)),$(TSTORES_DEFAULT))
HEADS_GRID ?= linear,gated,hateclipper,xattn,scabg,transformer

.PHONY: setup demo test features train sweep ablations ablate-modality compare-heads bench bench-quick gpu-wheels lint docs clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/mmcache data demo --out data/demo
	$(MAKE) --no-print-directory features DATASET=demo
	$(BIN)/heads sweep --dataset demo --vtype clip --ttype clip --hp D=$(D) --grid 'ablation=0,1,2' $(THREAD_ARG)
	@echo "ablation=0: image + text fusion   ablation=1: text only   ablation=2: image only"

test: $(STAMP)
	$(BIN)/python -m pytest tests -p no:cacheprovider

features: $(STAMP)
	$(BIN)/mmcache extract $(DATASET) --data-dir $(DATA_DIR) --cache-dir $(CACHE_DIR) $(FEATURES) $(EXTRACT_ARGS)

train: $(STAMP)
	$(BIN)/heads train --dataset $(DATASET) --cache-dir $(CACHE_DIR) --head $(HEAD) --vtype $(VTYPE) --ttype $(TTYPE) --D $(D) $(THREAD_ARG) $(EPOCH_ARG) $(TRAIN_ARGS)

sweep: $(STAMP)
	$(BIN)/heads sweep --dataset $(DATASET) --cache-dir $(CACHE_DIR) --vtype $(VTYPE) --ttype $(TTYPE) --grid '$(GRID)' $(THREAD_ARG) $(EPOCH_ARG) $(TRAIN_ARGS)

ablations: $(STAMP)
	$(BIN)/heads sweep --dataset $(DATASET) --cache-dir $(CACHE_DIR) --seeds $(SEEDS) $(THREAD_ARG) $(EPOCH_ARG) $(TRAIN_ARGS) \
	  --grid 'vtype=$(VSTORES);ttype=$(TSTORES);D=128,256,512;lr=1e-4,1e-3'

ablate-modality: $(STAMP)
	$(BIN)/heads sweep --dataset $(DATASET) --cache-dir $(CACHE_DIR) --vtype $(VTYPE) --ttype $(TTYPE) --hp D=$(D) \
	  --seeds $(SEEDS) $(THREAD_ARG) $(EPOCH_ARG) $(TRAIN_ARGS) --grid 'modalities=["image"],["text"],["image","text"]'

compare-heads: $(STAMP)
	$(BIN)/heads sweep --dataset $(DATASET) --cache-dir $(CACHE_DIR) --vtype $(VTYPE) --ttype $(TTYPE) --hp D=$(D) \
	  --seeds $(SEEDS) $(THREAD_ARG) $(EPOCH_ARG) $(TRAIN_ARGS) --grid 'head=$(HEADS_GRID)'

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b $(BENCH_ARGS) || exit 1; done
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Wheels of the packages a GPU machine's own python (3.12, with torch) lacks, for bench/gpu.sh there.
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(BIN)/python -m pip freeze | grep -i -E '^(open.clip.torch|ftfy|wcwidth)==')
	ls .whl

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick --check --out bench/results-quick

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	@echo "site/index.html"

lint: $(STAMP)
	$(BIN)/ruff check mmcache tests bench
	$(BIN)/mypy mmcache

clean-demo:
	rm -rf data/demo cache/demo runs/demo
