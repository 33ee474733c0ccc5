# Two commands do all set-up: `make demo` (quantize a real LLM and print a
# before/after table) and `make test` (the test suite CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

FORCE:

.PHONY: demo test optimum-venv test-slow test-cuda test-oldest-ort install sanitize bench-llm bench-vs-ort bench-deploy clean

# The editable install maps each module to its file: when modules are added,
# moved or removed, it must be made again (the list is rewritten only when it changes).
MODULE_LIST := $(VENV)/.module-list
$(MODULE_LIST): FORCE
	@mkdir -p $(VENV)
	@find onnx_gptq -name '*.py' | LC_ALL=C sort > $@.new
	@cmp -s $@.new $@ && rm -f $@.new || mv $@.new $@

$(STAMP): pyproject.toml CMakeLists.txt $(MODULE_LIST)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, pinned: anything else pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) bench/demo.py

test: $(STAMP) optimum-venv
	$(PY) -m pytest -q

# Optimum's exporter and ORTModelForCausalLM (optimum-onnx) pin transformers 4.x,
# which clashes with the project's 5.x, so they get a venv of their own; the
# folder tests run its python in a subprocess (tests/optimum_roundtrip.py) and
# skip when it is missing. CPU torch first, pinned, as above.
OPTIMUM_VENV := build/venv-optimum
$(OPTIMUM_VENV)/.installed:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OPTIMUM_VENV)/bin/python -m pip install -q optimum-onnx onnxruntime
	touch $@

optimum-venv: $(OPTIMUM_VENV)/.installed

# The benchmarks recorded in docs/BENCHMARKS.md (tens of minutes on 2 cores).
bench-llm: $(STAMP)
	$(PY) bench/bench_llm.py --markdown bench-llm.md

bench-vs-ort: $(STAMP)
	$(PY) bench/bench_vs_ort.py --num-samples 32 --seq-len 256 --sym --markdown bench-vs-ort.md

# issue 11's deployment benchmark: onnx-gptq's folders against onnxruntime-genai's builder int4
# (finished rows are cached: a rerun measures only what changed; ROWS=a,b picks rows).
bench-deploy: $(STAMP)
	$(PY) bench/bench_deploy.py $(if $(ROWS),--rows $(ROWS)) --json bench-deploy.json --markdown bench-deploy.md

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-cuda: $(STAMP)
	$(PY) -m pytest -q -m cuda

# The custom-op tests against the oldest onnxruntime pyproject.toml accepts
# (its "onnxruntime>=X" bound), run on the library `make install` built into
# onnx_gptq/_lib/. They get a small venv of their own under build/, so the
# project venv keeps its onnxruntime: onnxruntime 1.18 wheels do not import
# under NumPy 2, so that venv holds NumPy 1.x and only what the custom-op tests
# import (no torch: --noconftest skips the tiny-model fixtures they do not use).
ORT_OLDEST := $(shell sed -n 's/^ *"onnxruntime>=\([0-9.]*\)",*$$/\1/p' pyproject.toml)
OLDEST_VENV := build/venv-onnxruntime-$(ORT_OLDEST)
CUSTOM_OP_TESTS := tests/test_custom_ops.py tests/test_ort_abi.py tests/test_fuzz_gptq_matmul.py tests/test_contract.py

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "onnxruntime==$(ORT_OLDEST)" "numpy<2" onnx onnx-ir ml_dtypes \
		tqdm psutil pytest
	touch $@

test-oldest-ort: $(STAMP) $(OLDEST_VENV)/.installed
	@test -n "$(ORT_OLDEST)" || { echo "no onnxruntime>=X bound found in pyproject.toml" >&2; exit 2; }
	$(OLDEST_VENV)/bin/python -c 'import onnxruntime as o; v = o.__version__; \
		assert v.startswith("$(ORT_OLDEST)."), v; print("custom-op tests against onnxruntime", v)'
	PYTHONPATH=$(CURDIR) $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider --noconftest $(CUSTOM_OP_TESTS)

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
		$(PY) -m pytest -q -p no:cacheprovider tests/test_custom_ops.py tests/test_fuzz_gptq_matmul.py tests/test_ort_abi.py

clean:
	rm -rf $(VENV) build onnx_gptq/_lib .pytest_cache
