# make test: fresh .venv, torch==2.14.1 first, the project (C++ and CUDA extension) without
#            build isolation, then pytest tests/ with the CMake build + ctest beside it.
# make bench: same set-up, then the default benchmark sweep on this CPU into results/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the toolkit that the nvcc on PATH belongs to (nvcc may be a wrapper script)
CUDA_HOME ?= $(shell command -v nvcc >/dev/null 2>&1 && cd "$$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$$ _HERE_=//p' | head -1)/.." && pwd)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: test bench install venv ctest pytest clean gpu-check

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
	$(PIP) install -q ninja "setuptools>=77" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

ctest: install
	@if [ -f CMakeLists.txt ] && [ -d csrc/tests ]; then \
	  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
	    -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
	    -DPython_EXECUTABLE=$(abspath $(PY)) >build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }; \
	  cmake --build build/cmake -j $(MAX_JOBS) >>build/cmake.log 2>&1 || { tail -50 build/cmake.log; exit 1; }; \
	  ctest --test-dir build/cmake --output-on-failure; \
	fi

pytest: install
	$(PY) -m pytest tests/ -q -ra --durations=15 -p no:cacheprovider

# The CMake build + ctest run in the background beside pytest (one compile job: pytest leaves a
# core idle most of the time, its Triton-interpreter tests being single-threaded); their output is
# printed when pytest ends, and either failing fails the target.
test: install
	@mkdir -p build
	@$(MAKE) --no-print-directory ctest MAX_JOBS=1 >build/ctest.out 2>&1 & ctest_pid=$$!; \
	$(MAKE) --no-print-directory pytest; pytest_rc=$$?; \
	wait $$ctest_pid; ctest_rc=$$?; \
	echo "---- CMake build + ctest (ran beside pytest): exit $$ctest_rc ----"; \
	cat build/ctest.out; \
	[ $$pytest_rc -eq 0 ] && [ $$ctest_rc -eq 0 ]

bench: install
	$(PY) -m adaperceiver.bench --out-dir results
	@if $(PY) -c "import sys; from adaperceiver import _ext; sys.exit(0 if _ext.build_info()['cpu_native_bf16'] else 1)"; then \
	  echo; echo "---- bfloat16 (this CPU runs bf16 natively) ----"; \
	  $(PY) -m adaperceiver.bench --precision bfloat16 --out-dir results/bf16; \
	else \
	  echo; echo "bfloat16 table skipped: no native bf16 on this CPU (AVX512-BF16 / AMX-BF16); bf16 would compute in float32"; \
	fi

# make gpu-check: the GPU path checked and timed on one GPU in at most 10 minutes (every stage
# under its own limit) into results/gpu/ (report.txt + gpu_check.json); without a CUDA device it
# says so and runs its dry mode (tiny shapes, Triton interpreter), as tests/test_gpu_check.py does.
gpu-check: install
	$(PY) -m adaperceiver.bench.gpu_check --out-dir results/gpu

clean:
	rm -rf build $(VENV) *.egg-info results
