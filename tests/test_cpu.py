"""XLA:CPU's workarounds (nfnets.cpu) run on the CPU only: on GPU and TPU none of them runs, the train step
is one program with a rolled micro-batch loop, and JAX's caches are never cleared."""
import jax
from jax.sharding import NamedSharding
import pytest

import experiment
from nfnets import conv
from nfnets import cpu
from nfnets.devices import SPLIT
from test_experiment import fake_batch, tiny_config


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_cpu_machinery_runs_on_the_cpu_only(backend, monkeypatch):
  calls = []

  class FakeLibc:
    def malloc_trim(self, pad):
      calls.append('malloc_trim')
      return 1

  monkeypatch.setattr(jax, 'clear_caches', lambda: calls.append('clear_caches'))
  monkeypatch.setattr(cpu.ctypes, 'CDLL', lambda *a, **k: FakeLibc())
  real_choose = cpu.tuning.choose
  monkeypatch.setattr(cpu.tuning, 'choose', lambda *a, **k: calls.append('tuning') or real_choose(*a, **k))
  monkeypatch.setattr(cpu, 'MIN_TUNED_MACS', 0)   # every convolution asks for a measured choice on CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)

  cfg = tiny_config(grad_accum_steps=2, **{'model.conv_impl': 'auto'})
  xp = experiment.Experiment(cfg, devices=jax.local_devices()[:2])
  batch = fake_batch(2, xp.per_device_batch)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(xp.mesh, SPLIT)),
                        batch)
  hlo = xp.jitted_train_step.lower(xp.state_shapes(), shapes).as_text()
  state, metrics = xp.train_step(xp.init_state(), xp.put_batch(batch))
  jax.block_until_ready((state, metrics))

  if backend == 'cpu':   # the positive control: each workaround does run here
    assert {'clear_caches', 'malloc_trim', 'tuning'} <= set(calls)
    assert 'stablehlo.while' not in hlo   # the two micro-batches unrolled
    assert cpu.compiler_options(True) and conv.resolve_impl('auto') == 'tuned'
  else:
    assert calls == []
    assert 'stablehlo.while' in hlo       # one rolled loop over the micro-batches
    assert cpu.compiler_options(True) is None and conv.resolve_impl('auto') == 'xla'
    assert cpu.release_free_memory() is False and cpu.loop_unroll() is False
