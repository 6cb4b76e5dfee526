# One entry point per job. `make train` and `make test` set up the environment themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train sweep test test-full lint format bench bench-gpu validate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch / torchvision pinned explicitly: a bare `torch` requirement may pull a different multi-GB build.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m consisid_lab.train $(ARGS)

sweep: $(STAMP)
	$(BIN)/python -m consisid_lab.train -m +experiment=consisid,full,no_global,no_local,no_keypoints seed=0,1,2 $(ARGS)

validate: $(STAMP)
	$(BIN)/python -m consisid_lab.validate_benchmark $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-full: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check consisid_lab hydra_plugins tests benchmarks
	$(BIN)/ruff format --check consisid_lab hydra_plugins tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix consisid_lab hydra_plugins tests benchmarks
	$(BIN)/ruff format consisid_lab hydra_plugins tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_synthetic.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_preprocess.py

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
