"""Test-wide settings: a persistent XLA compilation cache, so identical train steps compile once."""
import os

import jax

# Op implementations are not measured in tests (nfnets.cpu.tuning): every run takes the same numerical path.
# tests/test_tuning.py turns measuring on where it is the subject.
os.environ.setdefault('NFNETS_TUNING', 'off')

# configs/base.py puts the compilation cache under $XDG_CACHE_HOME: here, beside the other test caches
# (also for the train.py subprocesses the CLI tests start, which inherit the environment).
os.environ['XDG_CACHE_HOME'] = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '.pytest_cache'))
jax.config.update('jax_compilation_cache_dir', os.path.join(os.environ['XDG_CACHE_HOME'], 'nfnets', 'jax'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
