# Every target sets itself up from a fresh clone: `make setup` creates .venv and installs
# the runtime, export/training and dev dependencies (torch pinned ==2.13.0, CPU build).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_DONE := $(VENV)/.setup-done
MODEL_DIR ?= models/en-fr-small
CORPUS_DIR ?= data/corpus
SEED ?= 1234

.PHONY: setup corpus train eval translate export verify test lint clean

setup: $(SETUP_DONE)

$(SETUP_DONE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[export,dev]'
	touch $@

# The synthetic corpus (deterministic for a seed; the same one training generates).
$(CORPUS_DIR)/test.tsv: | $(SETUP_DONE)
	$(PY) -m export.corpus --out $(CORPUS_DIR) --seed $(SEED)

corpus: $(CORPUS_DIR)/test.tsv

# Corpus → tokenizer → Transformer, written to $(MODEL_DIR) (the committed default model).
train: $(SETUP_DONE)
	$(PY) -m export.train --out $(MODEL_DIR) --corpus-dir $(CORPUS_DIR) --seed $(SEED)

# BLEU / chrF / exact match on valid, test and held-out combinations; writes the model card.
eval: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m export.evaluate --model-dir $(MODEL_DIR) --corpus-dir $(CORPUS_DIR)

# Interactive reference translator: one English sentence per line on stdin.
translate: $(SETUP_DONE)
	$(PY) -m export.translate --model-dir $(MODEL_DIR)

# The fp32 ONNX graphs (weights external: they point into model.safetensors) + manifest.json,
# written in place into $(MODEL_DIR), next to the weights (docs/model-directory.md).
export: $(SETUP_DONE)
	$(PY) -m export --model-dir $(MODEL_DIR)

# ONNX vs PyTorch: parity, cache equivalence, token-identical decoding of the whole test set,
# batch invariance, checksums, and the committed directory equal to a fresh export.
verify: $(SETUP_DONE)
	$(PY) -m export.verify --model-dir $(MODEL_DIR) --corpus-dir $(CORPUS_DIR)

test: $(SETUP_DONE)
	$(PY) -m pytest -q

lint: $(SETUP_DONE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache *.egg-info
