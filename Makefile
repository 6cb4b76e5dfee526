# One entry point per job. `make train` and `make test` set up the environment themselves.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train sweep test test-full lint format bench bench-gpu gpu-wheels validate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch / torchvision pinned explicitly: a bare `torch` requirement may pull a different multi-GB build.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,released,fast]'
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

# Wheels for benchmarks/bench_gpu_device.sh: the packages the GPU benchmark needs that the device image lacks,
# for its Python 3.12 (torch, lightning, numpy are the image's own). antlr4 4.9.3 ships no wheel: built here.
WHEEL_PLATFORMS := $(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.0 torchao==0.18.0 \
		importlib_metadata
	$(BIN)/python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
