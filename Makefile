# otmf_exp — `make demo` and `make test` are all a newcomer needs (both set up .venv when missing).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-full test-all lint format clean-outputs tables plots bench bench-quick bench-peer bench-peer-quick gpu-prepare

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/otmf-exp:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,launchers,plots]'

setup: $(BIN)/otmf-exp ## create .venv with torch and the package (editable) + dev tools

demo: setup ## the default run: OTMF-style continual merging on the offline digits8 suite
	$(BIN)/python -m otmf_exp.run

# tests run in parallel (pytest-xdist, one worker per core; each worker one torch thread)
XDIST ?= -n auto

test: setup ## the fast tier (unit tests + one end-to-end run per method and protocol), a few minutes
	$(BIN)/python -m pytest -q $(XDIST) -m 'not full and not slow and not network and not gpu'

test-full: setup ## the second tier: CLI subprocesses, hub fixtures, sweeps, resume, reference replays
	$(BIN)/python -m pytest -q $(XDIST) -m 'full and not slow and not network and not gpu'

test-all: setup ## every test including slow ones (still offline)
	$(BIN)/python -m pytest -q $(XDIST) -m 'not network and not gpu'

lint: setup ## ruff lint + format check
	$(BIN)/ruff check src tests scripts conf
	$(BIN)/ruff format --check src tests scripts conf

format: setup ## ruff format + autofix
	$(BIN)/ruff format src tests scripts conf
	$(BIN)/ruff check --fix src tests scripts conf

RUNS ?= multirun outputs
REPORTS ?= reports
ARGS ?=

tables: setup ## tables (markdown, LaTeX, CSV) from run dirs into reports/tables (RUNS="dir ..." to choose)
	$(BIN)/python scripts/make_tables.py $(RUNS) --out $(REPORTS)/tables $(ARGS)

plots: setup ## PNG+PDF figures from run dirs into reports/plots (RUNS="dir ...", ARGS="--format png,svg --dpi 300")
	$(BIN)/python scripts/plot.py $(RUNS) --out $(REPORTS)/plots $(ARGS)

bench: setup ## time/memory benchmarks on the real ViT-B/32 architecture (GPU if present) -> BENCHMARKS.md, benchmarks.json
	$(BIN)/python scripts/bench.py

bench-quick: setup ## same measurements with fewer iterations, live RSS on CPU (CPU-sized, about 3 h on 2 cores)
	$(BIN)/python scripts/bench.py --quick --live-rss

PARITY_PY ?= .venv-parity/bin/python
bench-peer: setup ## every shared method, ours beside FusionBench 0.2.33's class (ViT-B/32, 8 tasks, 1 thread and auto, min of 3)
	@test -x $(PARITY_PY) || { echo "error: no FusionBench Python at $(PARITY_PY); run make parity-venv first"; exit 2; }
	$(BIN)/python scripts/bench.py --peer --fusionbench-python $(PARITY_PY)

bench-peer-quick: setup ## the same at the quick size (ViT-B/32 widths, 4 of 12 blocks): what a 2-core CPU box runs
	@test -x $(PARITY_PY) || { echo "error: no FusionBench Python at $(PARITY_PY); run make parity-venv first"; exit 2; }
	$(BIN)/python scripts/bench.py --peer --quick --fusionbench-python $(PARITY_PY)

gpu-prepare: ## wheels for a GPU machine that lacks them (.whl/); then scripts/gpu/bench.sh main|rest there
	bash scripts/gpu/prepare.sh

clean-outputs: ## delete Hydra run dirs (outputs/, multirun/)
	rm -rf outputs multirun
