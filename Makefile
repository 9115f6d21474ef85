# `make test` and `make demo` work on a fresh machine: they create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Tests run on the CPU with 4 simulated devices so multi-device code paths are exercised.
TEST_ENV := JAX_PLATFORMS=cpu NFNETS_TUNING=off XLA_FLAGS=--xla_force_host_platform_device_count=4 TF_CPP_MIN_LOG_LEVEL=2

.PHONY: venv test demo bench clean

# The package itself in editable mode (pyproject.toml): `nfnets` and the nfnets-* commands work from any folder
# once .venv is activated (`source .venv/bin/activate`).
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(TEST_ENV) $(PY) -m pytest -q -n 2 tests

# Trains the demo model, then writes the sample inputs of the README's examples (runs/samples).
demo: venv
	JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 $(PY) train.py --config=configs/demo.py --workdir=runs/demo
	$(PY) -m tools.sample_images --out=runs/samples

bench: venv
	JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m benchmarks.bench --config=configs/f0.py --batch_size=8 --resolution=192 --steps=5

clean:
	rm -rf runs .pytest_cache
