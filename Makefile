# Two commands on a fresh machine (each installs what it needs into .venv):
#   make demo   - the main job: train a denoiser with and without D2SM, compare (CPU, ~10 min)
#   make test   - the whole test suite
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# torch is installed before the package (PyTorch-extension convention: the build uses it).
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml setup.py tools/triton_versions.py $(wildcard csrc/* csrc/*/*)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel ninja
	$(VPY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VPY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	# the oldest claimed Triton beside the venv's own, for the kernels' ahead-of-time compile test
	$(VPY) tools/triton_versions.py install $(VENV)
	touch $(STAMP)

install: $(STAMP)

# Two xdist workers (the CI machine has 2 cores); a file whose module-scoped fixtures spawn process
# groups is one xdist_group, run by one worker, so its processes start once.
test: $(STAMP)
	$(VPY) -m pytest -q -n 2 --dist loadgroup tests

# The quick loop while developing: everything except the tests marked slow (builds, subprocesses).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" tests

# Benchmarks (not part of `make test`): the comparison table + sweep plots, the queue steps, then pytest-benchmark.
bench: $(STAMP)
	$(VPY) -m benchmarks.compare --out out/bench
	$(VPY) -m benchmarks.queue_steps --out out/bench
	$(VPY) -m pytest -q benchmarks --benchmark-json=out/bench/pytest_benchmark.json

demo: $(STAMP)
	$(VPY) -m d2sm_ext demo --out demo_out

clean:
	rm -rf $(VENV) build *.egg-info
