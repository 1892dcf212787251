# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DZC := $(VENV)/bin/dzc
STAMP := $(VENV)/.dzc-installed
DEMO_MODEL := examples/demo-model
DEMO_OUT := build/demo-cpu

.PHONY: demo test install clean

install: $(STAMP)

# Re-install when the dependency list changes; the editable install picks up source edits by itself.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(DZC) compile $(DEMO_MODEL) --target cpu -o $(DEMO_OUT)
	$(DZC) run $(DEMO_OUT) --prompt "Once upon a time" --max-tokens 64 --seed 1

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV)

# Not part of test: a llama-bench-shaped table on a synthetic 1.4B-param DeepSeek-V3-shaped checkpoint (~10 GB of
# disk in $(BENCH_DIR), about an hour on two cores). Run it on a quiet machine. It includes llama.cpp rows
# (bench/llama_cpp_bench.py: the llama-cpp-python sdist, built and its GGUFs made in $(BENCH_DIR)/llama.cpp once: ~5 GB,
# ~15 minutes the first time); add BENCH_ARGS="--llama-cpp ''" to leave them out.
BENCH_DIR ?= /tmp/dzc-bench
.PHONY: bench
bench: $(STAMP)
	test -f $(BENCH_DIR)/dsv3-bf16/config.json || $(PY) bench/make_checkpoint.py $(BENCH_DIR)/dsv3-bf16
	test -f $(BENCH_DIR)/dsv3-fp8/config.json || $(PY) bench/make_checkpoint.py $(BENCH_DIR)/dsv3-fp8 --fp8
	$(PY) bench/run.py --bf16 $(BENCH_DIR)/dsv3-bf16 --fp8 $(BENCH_DIR)/dsv3-fp8 --work $(BENCH_DIR) --threads 1 2 $(BENCH_ARGS)
