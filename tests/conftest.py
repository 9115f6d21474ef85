"""Test-wide settings: a persistent XLA compilation cache, so identical train steps compile once."""
import os

import jax

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
