# Every target sets itself up from a fresh clone. `make setup` is a chain of stamped steps, each
# re-run only when what it depends on changes:
#   .venv (exactly requirements/dev.txt, the lock: runtime + export/training + dev; torch 2.13.0+cpu)
#   → the gRPC code generated from protos/   → the model variants derived from the fp32 graphs
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_DONE := $(VENV)/.installed
SETUP_DONE := $(VENV)/.setup-done
MODEL_DIR ?= models/en-fr-small
CORPUS_DIR ?= data/corpus
SEED ?= 1234

.PHONY: setup lock proto corpus train eval translate export variants verify bench-kv bench-calls bench-gc \
	bench-import bench-peers bench-step bench-search bench-kernels bench-overload bench-stall bench soak run \
	test test-full fuzz lint clean compose-up compose-down import-hf

setup: $(SETUP_DONE)

# The venv installs the lock, hashes checked, and nothing else (pip-sync removes what the lock no
# longer has); then the project itself, editable, built by the locked setuptools. The last step fails
# setup if the environment is not exactly the lock (`pip freeze` = requirements/dev.txt).
LOCK := requirements/dev.txt

$(VENV_DONE): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip-sync --quiet $(LOCK)
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m requirements.lock --check
	touch $@

# Re-resolve requirements/*.txt to the newest versions pyproject.toml allows (≈5 min; the one way to
# upgrade a dependency: then `make test-full`, and commit the locks with what the upgrade needed).
lock: $(VENV_DONE)
	$(PY) -m requirements.lock

# The Python code of the gRPC API: protos/**/*.proto → service/api/translator/… (messages, stubs,
# servicers and their .pyi; service/api/codegen.py). Generated, never committed; regenerated when a
# .proto, the generator or the installed tools change.
PROTO_FILES := $(shell find protos -name '*.proto')
PROTO_DONE := service/api/translator/.generated

$(PROTO_DONE): $(PROTO_FILES) service/api/codegen.py $(VENV_DONE)
	$(PY) -m service.api.codegen
	touch $@

proto: $(PROTO_DONE)

# The derived variants of $(MODEL_DIR): int8/ (CPU), fp16/ (GPU), optimized/ (fp32, fused), each
# with its own manifest, made from the fp32 graphs (docs/model-directory.md); never committed.
# Setup builds them when the fp32 files (or the code) change, measuring int8 against fp32 on 200
# test sentences (≈10 s); `make variants` rebuilds them measuring on the whole test split.
VARIANT_MANIFESTS := $(foreach v,int8 fp16 optimized,$(MODEL_DIR)/$(v)/manifest.json)
FP32_FILES := $(addprefix $(MODEL_DIR)/,manifest.json encoder.onnx decoder_step.onnx attention.onnx \
	model.safetensors tokenizer.json)

$(VARIANT_MANIFESTS) &: $(FP32_FILES) $(wildcard export/variants/*.py) $(VENV_DONE)
	$(PY) -m export.variants --model-dir $(MODEL_DIR) --sentences 200

variants: $(VENV_DONE)
	$(PY) -m export.variants --model-dir $(MODEL_DIR) --sentences 0

$(SETUP_DONE): $(VENV_DONE) $(PROTO_DONE) $(VARIANT_MANIFESTS)
	touch $@

# The synthetic corpus (deterministic for a seed; the same one training generates).
$(CORPUS_DIR)/test.tsv: | $(VENV_DONE)
	$(PY) -m export.corpus --out $(CORPUS_DIR) --seed $(SEED)

corpus: $(CORPUS_DIR)/test.tsv

# Corpus → tokenizer → Transformer, written to $(MODEL_DIR) (the committed default model).
train: $(VENV_DONE)
	$(PY) -m export.training.train --out $(MODEL_DIR) --corpus-dir $(CORPUS_DIR) --seed $(SEED)

# BLEU / chrF / exact match on valid, test and held-out combinations; writes the model card.
eval: $(VENV_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m export.training.evaluate --model-dir $(MODEL_DIR) --corpus-dir $(CORPUS_DIR)

# Interactive reference translator: one English sentence per line on stdin.
translate: $(VENV_DONE)
	$(PY) -m export.translate --model-dir $(MODEL_DIR)

# The fp32 ONNX graphs (weights external: they point into model.safetensors) + manifest.json,
# written in place into $(MODEL_DIR), next to the weights (docs/model-directory.md).
export: $(VENV_DONE)
	$(PY) -m export --model-dir $(MODEL_DIR)

# A local Hugging Face checkpoint (MarianMT / OPUS-MT) → a model directory the server serves by its
# name: make import-hf SRC=path/to/opus-mt-en-de OUT=models/opus-mt-en-de. Nothing is downloaded.
import-hf: $(VENV_DONE)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make import-hf SRC=checkpoint-dir OUT=model-dir" >&2; exit 2; }
	$(PY) -m export.import_hf $(SRC) --out $(OUT)
	$(PY) -m export.variants --model-dir $(OUT)

# ONNX vs PyTorch: parity, cache equivalence, token-identical decoding of the whole test set,
# batch invariance, checksums, and the committed directory equal to a fresh export.
verify: $(SETUP_DONE)
	$(PY) -m export.onnx.verify --model-dir $(MODEL_DIR) --corpus-dir $(CORPUS_DIR)

# The KV-cache speed-up benchmark (a measurement, not a test; ≈2 min on 2 cores): the cached loop
# against recomputing the prefix, 16/32/64 output tokens at batch 1 and 32 → docs/kv-cache-benchmark.md.
bench-kv: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.kv_cache --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/kv-cache-benchmark.md

# Server CPU per gRPC call: grpc.aio alone, the service with one-token calls, the encoder (≈1 min).
bench-calls: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.call_cost --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/call-cost.md

# The garbage collector's pauses in the server under load, frozen startup objects or not (≈1 min)
bench-gc: $(SETUP_DONE)
	$(PY) -m bench.gc_pauses --model-dir $(MODEL_DIR) --out docs/gc-pauses.md

# A transformer-base-sized MarianMT checkpoint (random weights, built here) imported and served beside
# $(MODEL_DIR): import time, model-directory size (fp32, int8), the server's resident memory (≈2 min).
bench-import: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.import_hf --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/import-benchmark.md

# The decoder-step graph alone, traced against fused (export.variants.fused_step), fp32 and int8, at
# batch 1/8/32/64: a markdown table on stdout (≈1 min). The figures are in docs/variants.md.
bench-step: $(SETUP_DONE)
	$(PY) -m bench.step_graphs --model-dir $(MODEL_DIR) $(ARGS)

# Single onnxruntime kernels at the decoder step's sizes (matrix products: fp32, MatMulNBits,
# DynamicQuantizeMatMul; self-attention: MultiHeadAttention against the in-place GroupQueryAttention):
# markdown tables on stdout (≈1 min). The figures are in docs/variants.md.
bench-kernels: $(SETUP_DONE)
	$(PY) -m bench.kernels $(ARGS)

# The Python cost of the search bookkeeping per decoder step (service.decoding.advance_rows replaying
# recorded log-probs, greedy and beam 4, batch 1/8/32/64), against a git revision's with
# BASELINE=rev (outputs checked identical): a markdown table on stdout (≈1 min).
bench-search: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.search_cost --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv $(if $(BASELINE),--baseline $(BASELINE)) $(ARGS)

# This engine against CTranslate2 and Transformers on the same weights (the default model and a random
# transformer-base-sized Marian), greedy and beam 4 at batch 1/8/32/64, memory and the service over gRPC
# → docs/peers.md, docs/peers.png, bench/results/peers-<machine>.json (≈40 min on 2 cores).
bench-peers: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.peers --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/peers.md $(ARGS)

# Overload (a measurement, not a test; ≈4 min on 2 cores): `python -m service` at 0.5×–4× its measured
# capacity, every call with a 2 s deadline, before and after deadline-aware admission, and with gRPC's
# concurrency bound: goodput, refusals, expiries, refusal latency → the ## Overload section of
# docs/reliability.md.
bench-overload: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.overload --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/reliability.md

# The soak (a check and a measurement; the standard run: 30 min per server, ≈65 min): `python -m service`,
# then `--workers 2`, under a mixed load with bursts beyond capacity; every call reconciled with
# translator_requests_total, 0 lost, gauges back at 0, RSS growth after warm-up → the ## Soak section
# of docs/reliability.md. Shorter: make soak ARGS='--duration 600 --workers 1'.
soak: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.soak --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/reliability.md $(ARGS)

# Whether one huge request stalls the others (≈1 min): a 4 MB text and the largest requests refused
# while small calls go on, printed as the table of docs/reliability.md; ROOT=checkout to measure another.
bench-stall: $(SETUP_DONE)
	$(PY) -m bench.request_stall $(if $(ROOT),--root $(ROOT))

# The service benchmark (a measurement, not a test; ≈9 min on 2 cores): the in-process gRPC server under
# closed- and open-loop load (continuous, collect-then-run, batch 1), the engine alone at batch 1/8/32/64
# and the KV cache at batch 64 × 64 tokens → docs/benchmarks.md and docs/benchmarks.json.
bench: $(SETUP_DONE) $(CORPUS_DIR)/test.tsv
	$(PY) -m bench.load --model-dir $(MODEL_DIR) --corpus $(CORPUS_DIR)/test.tsv --out docs/benchmarks.md --json docs/benchmarks.json

# The gRPC server: the committed default model on CPU, gRPC on :50051, metrics on :9090 (defaults of
# service/config.py); e.g. `make run ARGS='--port 50052 --log-format json'`. Ctrl-C drains and exits.
run: $(SETUP_DONE)
	$(PY) -m service $(ARGS)

# docker compose v2 (deploy/docker-compose.yml): the replicas behind nginx on localhost:50061, Prometheus
# on 127.0.0.1:9190, Grafana on 127.0.0.1:3000 (admin / the password in deploy/.env, copied from
# deploy/.env.example), ports apart from `make run`'s. `make compose-up PROFILE=gpu`: the GPU image.
# Scale with `docker compose -f deploy/docker-compose.yml --profile cpu up -d --scale translator=4`.
compose-up:
	@test -f deploy/.env || { echo "deploy/.env is missing: cp deploy/.env.example deploy/.env, then set GRAFANA_ADMIN_PASSWORD in it" >&2; exit 1; }
	docker compose -f deploy/docker-compose.yml --profile $(or $(PROFILE),cpu) up -d --build

compose-down:
	docker compose -f deploy/docker-compose.yml --profile cpu --profile gpu down

# The developer's loop (≈3 min on 2 cores): every test but the long end-to-end ones marked `full`.
test: $(SETUP_DONE)
	$(PY) -m pytest -q -m 'not full'

# Everything CI runs (≈6 min quiet): the whole suite, then make verify (the whole test split vs PyTorch).
test-full: $(SETUP_DONE)
	$(PY) -m pytest -q
	$(MAKE) verify

# Property-based fuzzing of Translate, TranslateStream and Attend (tests/service/test_fuzz.py) at ten
# times the cases of make test, drawn at random rather than from its fixed sequence (≈20,000 calls,
# ≈4 min on 2 cores; EXAMPLES=n for another count). A failure prints the example and its blob.
fuzz: $(SETUP_DONE)
	FUZZ_EXAMPLES=$(or $(EXAMPLES),20000) $(PY) -m pytest -q -s tests/service/test_fuzz.py

lint: $(SETUP_DONE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) data service/api/translator .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -rf $(foreach v,int8 fp16 optimized,$(MODEL_DIR)/$(v))
