"""The persistent compilation cache (config.compilation_cache_dir): a compiled train step is written there,
and the same step compiled again (a restarted run) is loaded from it; an empty value turns it off."""
import os

import jax
from jax import monitoring
import jax.numpy as jnp

import experiment
from test_experiment import fake_batch, tiny_config


def test_train_step_is_cached_on_disk_and_loaded_again(tmp_path):
  events = []
  listener = lambda name, **kw: events.append(name)
  monitoring.register_event_listener(listener)
  before = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    cache = tmp_path / 'cache'
    cfg = tiny_config(compilation_cache_dir=str(cache))
    xp = experiment.Experiment(cfg, devices=jax.local_devices()[:1])
    batch = xp.put_batch(fake_batch(1, xp.per_device_batch))
    xp.train_step(xp.init_state(), batch)
    written = set(os.listdir(cache))
    assert any(name.startswith('jit__train_step') for name in written), written
    # A restarted run: a new Experiment, nothing compiled in memory. The step is loaded, not compiled.
    jax.clear_caches()
    hits = events.count('/jax/compilation_cache/cache_hits')
    again = experiment.Experiment(cfg, devices=jax.local_devices()[:1])
    again.train_step(again.init_state(), batch)
    assert events.count('/jax/compilation_cache/cache_hits') >= hits + 2   # the state's and the step's
    assert set(os.listdir(cache)) == written

    # Off: a program that the cache would keep (any compile time, with these settings) is not written.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    experiment.Experiment(tiny_config(compilation_cache_dir=''), devices=jax.local_devices()[:1])
    jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(7)).compile()
    assert set(os.listdir(cache)) == written
    experiment.use_compilation_cache(str(cache))   # and the control: on, the same program is written
    jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(7)).compile()
    assert len(set(os.listdir(cache)) - written) == 1
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_time)
    monitoring.unregister_event_listener(listener)
    experiment.use_compilation_cache(before)
