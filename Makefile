# `make test` and `make demo` work on a fresh machine: they create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Tests run on the CPU with 4 simulated devices so multi-device code paths are exercised. Their models are
# tiny, so compiling dominates: LLVM at -O0 halves XLA:CPU's compile time (the tiny train step: 13.4 -> 6.8 s,
# its init 15.2 -> 5.5 s) without slowing the steps themselves, and XLA:CPU's older fusion emitters compile
# it in a further ~20% less. The tests' subprocesses get the same flags (tests/cli_helpers.py).
TEST_ENV := JAX_PLATFORMS=cpu NFNETS_TUNING=off TF_CPP_MIN_LOG_LEVEL=2 \
	XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

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

# --dist loadscope: a module's tests run in one worker, so its module-scoped fixtures (short training runs)
# are made once, not once per worker.
test: venv
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadscope tests

# Trains the demo model, then writes the sample inputs of the README's examples (runs/samples).
demo: venv
	JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 $(PY) train.py --config=configs/demo.py --workdir=runs/demo
	$(PY) -m tools.sample_images --out=runs/samples

bench: venv
	JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m benchmarks.bench --config=configs/f0.py --batch_size=8 --resolution=192 --steps=5

clean:
	rm -rf runs .pytest_cache
