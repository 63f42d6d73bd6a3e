# breastnet: every target runs inside .venv, which `make install` builds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?=
ARGS ?=
INPUT ?=
FOLDS ?= 5
SEARCH ?= image_optuna
SUMMARY_ARGS ?=
SWEEP ?=
SELECT_ARGS ?=
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
CV_DIR := logs/cv/$(STAMP)
SWEEP_DIR := logs/sweeps/$(SEARCH)_$(STAMP)
DATA_ARG := $(if $(DATA),data.data_dir=$(DATA),)
DEMO_DATA ?= data/demo
RUN := $(PY) -m breastnet
# Stops a target that needs data when nothing names them (DATA, BREASTNET_DATA, ARGS,
# conf/local/default.yaml) and the default data/BACH is absent: it would fail on the first stage.
need_data = $(if $(DATA)$(BREASTNET_DATA)$(ARGS)$(wildcard data/BACH conf/local/default.yaml),,\
	$(error make $@: set DATA=<BACH folder> (or ARGS=experiment=...); make demo runs on generated data))

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format demo data prepare patch features image evaluate predict pipeline cv sweep bench clean

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps staintools==2.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed ## build .venv with every pinned dependency

# One pytest-xdist worker per CPU this process may use (breastnet/threads.py: affinity,
# SLURM_CPUS_PER_TASK, cgroup quota; BREASTNET_CPUS overrides), up to 4, each with its share
# of torch threads; one CPU: no workers.
test: install ## fast test suite (what CI runs)
	@cpus=$$($(PY) -c 'from breastnet.threads import available_cpus; print(available_cpus())'); \
	workers=$$((cpus < 4 ? cpus : 4)); \
	[ $$workers -gt 1 ] || workers=0; \
	echo "pytest: $$cpus CPU(s), $$workers worker(s)"; \
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$((cpus / (workers > 0 ? workers : 1)))} \
		$(PY) -m pytest -m "not slow" -q -n $$workers

test-all: install ## every test, slow ones too (needs ../shared/data/bach-dev for some)
	$(PY) -m pytest -q

lint: install ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(DEMO_DATA): | install
	$(PY) -m breastnet.synthetic $(DEMO_DATA)

demo: install $(DEMO_DATA) ## whole pipeline on generated demo data, CPU
	$(RUN) experiment=demo data.data_dir=$(DEMO_DATA) $(ARGS)

data: install ## BACH from Zenodo (10.4 GB, resumes) into DATA or data/BACH; ACCEPT_LICENCE=1, ZIP=<copied zip>
	$(PY) -m breastnet.download bach --to $(or $(DATA),$(BREASTNET_DATA),data/BACH) \
		$(if $(filter 1 yes true,$(ACCEPT_LICENCE)),--accept-licence) $(if $(ZIP),--from-zip $(ZIP))

prepare: install ## index, split, Macenko-normalise and tile into the cache
	$(need_data)
	$(RUN) 'stages=[prepare]' $(DATA_ARG) $(ARGS)

patch: install ## fine-tune the patch CNN on the cached patches
	$(need_data)
	$(RUN) 'stages=[patch]' $(DATA_ARG) $(ARGS)

features: install ## pooled features + probabilities of every patch (best patch checkpoint)
	$(need_data)
	$(RUN) 'stages=[features]' $(DATA_ARG) $(ARGS)

image: install ## image model (BiLSTM by default) on the cached patch features
	$(need_data)
	$(RUN) 'stages=[image]' $(DATA_ARG) $(ARGS)

evaluate: install ## metrics, plots, predictions.csv, index.html on the test split
	$(need_data)
	$(RUN) 'stages=[evaluate]' $(DATA_ARG) $(ARGS)

predict: install ## trained pipeline on INPUT=<image or folder> (same DATA/ARGS as training)
	$(if $(INPUT)$(findstring predict.input=,$(ARGS)),,\
		$(error make predict: set INPUT=<image file or folder>))
	$(need_data)
	$(RUN) 'stages=[predict]' predict.input=$(INPUT) $(DATA_ARG) $(ARGS)

pipeline: install ## every stage in order
	$(need_data)
	$(RUN) $(DATA_ARG) $(ARGS)

cv: install ## cross-validation over data.fold (FOLDS=5), then mean ± std over the folds
	$(need_data)
	$(RUN) -m data.folds=$(FOLDS) 'data.fold=range($(FOLDS))' hydra.sweep.dir=$(CV_DIR) \
		run_group=cv-$(STAMP) $(DATA_ARG) $(ARGS); \
	status=$$?; $(PY) -m breastnet.summary $(CV_DIR) $(SUMMARY_ARGS); exit $$status

sweep: install ## image-model search (SEARCH=image_optuna | image_grid), then its summary
	$(need_data)
	$(RUN) -m hparams_search=$(SEARCH) hydra.sweep.dir=$(SWEEP_DIR) run_group=$(SEARCH)-$(STAMP) \
		$(DATA_ARG) $(ARGS); \
	status=$$?; $(PY) -m breastnet.summary $(SWEEP_DIR) $(SUMMARY_ARGS); exit $$status

.PHONY: select
select: install ## choose a recipe in SWEEP=<sweep dir> on the training side (nested per fold)
	$(if $(SWEEP),,$(error make select: set SWEEP=<sweep dir> (logs/cv/<time>, logs/sweeps/...)))
	$(PY) -m breastnet.select $(SWEEP) $(SELECT_ARGS)

bench: install ## prepare speed vs staintools on bach-dev
	$(PY) experiments/bench_prepare.py $(ARGS)

clean: ## remove caches of tools (not work/ or .venv)
	rm -rf .pytest_cache .ruff_cache
