# Two commands do all set-up: `make demo` (quantize a real LLM and print a
# before/after table) and `make test` (the test suite CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-cuda install sanitize bench-llm bench-vs-ort clean

$(STAMP): pyproject.toml CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned: anything else pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) bench/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# The benchmarks recorded in docs/BENCHMARKS.md (tens of minutes on 2 cores).
bench-llm: $(STAMP)
	$(PY) bench/bench_llm.py --markdown bench-llm.md

bench-vs-ort: $(STAMP)
	$(PY) bench/bench_vs_ort.py --num-samples 32 --seq-len 256 --sym --markdown bench-vs-ort.md

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

# The CPU custom-op library built with AddressSanitizer + UBSan into build-asan/,
# then the custom-op and fuzz tests run against it, child processes included
# (python itself is not instrumented, so libasan is preloaded; leak checking is
# off because python never frees everything at exit).
ASAN_LIB = $(CURDIR)/build-asan/custom_ops/libonnx_gptq_ops.so
sanitize: $(STAMP)
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DONNX_GPTQ_CUDA=OFF \
		-DONNX_GPTQ_SANITIZE=address,undefined
	cmake --build build-asan -j 2
	ONNX_GPTQ_CUSTOM_OPS_LIB=$(ASAN_LIB) \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_custom_ops.py tests/test_fuzz_gptq_matmul.py

clean:
	rm -rf $(VENV) build onnx_gptq/_lib .pytest_cache
