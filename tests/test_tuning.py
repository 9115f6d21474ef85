"""Measured choices (nfnets.cpu.tuning): measured once per machine and shape, cached, never trusted from
another machine or a damaged file; every candidate lowering of every convolution direction computes the same
thing."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import conv, cpu
from nfnets.cpu import tuning


@pytest.fixture
def tuning_on(tmp_path, monkeypatch):
  monkeypatch.setenv('NFNETS_TUNING', 'on')
  monkeypatch.setenv('NFNETS_TUNING_DIR', str(tmp_path))
  monkeypatch.setattr(tuning, '_caches', {})
  monkeypatch.setattr(tuning, '_used', {})
  return tmp_path


def _fast_and_slow():
  def slow(a):
    for _ in range(40):
      a = jnp.tanh(a @ a)
    return a
  return {'slow': slow, 'fast': lambda a: a + 1.0}


def _args():
  return tuning.random_args(((192, 192), np.float32))


def _count_measurements(monkeypatch):
  calls = []
  real = tuning.time_candidates

  def counted(*a, **k):
    calls.append(1)
    return real(*a, **k)
  monkeypatch.setattr(tuning, 'time_candidates', counted)
  return calls


def test_measures_once_then_reads_the_cache(tuning_on, monkeypatch):
  calls = _count_measurements(monkeypatch)
  assert tuning.choose('toy', '192', _fast_and_slow(), _args, default='slow') == 'fast'
  assert len(calls) == 1
  data = json.load(open(tuning.cache_path()))
  assert data['fingerprint'] == tuning.fingerprint()
  entry = data['entries']['toy']['192']
  assert entry['choice'] == 'fast' and entry['ms']['slow'] > entry['ms']['fast']
  # A new process (empty in-memory caches) reads the file instead of measuring.
  monkeypatch.setattr(tuning, '_caches', {})
  assert tuning.choose('toy', '192', _fast_and_slow(), _args, default='slow') == 'fast'
  assert len(calls) == 1
  assert tuning.used_choices()['toy 192']['choice'] == 'fast'


def test_cache_from_another_machine_is_ignored(tuning_on, monkeypatch):
  path = tuning.cache_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  other = dict(tuning.fingerprint(), cpu_model='Some Other CPU')
  with open(path, 'w') as f:   # e.g. a cache copied over from another machine under this one's name
    json.dump({'schema': tuning.SCHEMA, 'fingerprint': other,
               'entries': {'toy': {'192': {'choice': 'slow', 'ms': {}}}}}, f)
  calls = _count_measurements(monkeypatch)
  assert tuning.choose('toy', '192', _fast_and_slow(), _args, default='slow') == 'fast'
  assert len(calls) == 1
  assert json.load(open(path))['fingerprint'] == tuning.fingerprint()


def test_another_jax_version_gets_another_file(monkeypatch):
  fp = tuning.fingerprint()
  assert tuning.cache_path(fp) != tuning.cache_path(dict(fp, jax='0.0.1'))
  assert tuning.cache_path(fp) != tuning.cache_path(dict(fp, cpu_model='Intel Xeon'))


@pytest.mark.parametrize('content', ['{"schema": 1, "fingerprint"', 'null', '{"entries": 3}'])
def test_corrupt_cache_is_rebuilt(tuning_on, monkeypatch, content):
  path = tuning.cache_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(content)
  assert tuning.choose('toy', '192', _fast_and_slow(), _args, default='slow') == 'fast'
  assert json.load(open(path))['entries']['toy']['192']['choice'] == 'fast'


def test_off_uses_the_default_without_measuring(tmp_path, monkeypatch):
  monkeypatch.setenv('NFNETS_TUNING', 'off')
  monkeypatch.setenv('NFNETS_TUNING_DIR', str(tmp_path))
  calls = _count_measurements(monkeypatch)
  assert tuning.choose('toy', '192', _fast_and_slow(), _args, default='slow') == 'slow'
  assert not calls and not os.listdir(tmp_path)
  monkeypatch.setenv('NFNETS_TUNING', 'maybe')
  with pytest.raises(ValueError, match="NFNETS_TUNING='maybe'; accepted: on, off"):
    tuning.enabled()


# (N, H, C_in, C_out, k, stride, groups, padding)
CONVS = [(2, 9, 8, 12, 3, 1, 1, 'SAME'), (2, 10, 8, 12, 3, 2, 2, 'SAME'), (2, 11, 6, 6, 3, 2, 3, 'VALID'),
         (2, 12, 3, 16, 3, 2, 1, 'SAME'), (2, 8, 16, 8, 1, 1, 1, 'SAME'), (2, 9, 4, 8, 1, 2, 2, 'SAME')]


def _reference(x, w, s, g, p):
  return jax.lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=g, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('shape', CONVS, ids=lambda s: 'x'.join(map(str, s)))
def test_every_candidate_of_every_direction_is_the_same_convolution(shape):
  n, h, cin, cout, k, s, g, p = shape
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (n, h, h, cin))
  w = jax.random.normal(kw, (k, k, cin // g, cout))
  y, vjp = jax.vjp(lambda a, b: _reference(a, b, s, g, p), x, w)
  dy = jax.random.normal(kc, y.shape)
  want = {'forward': y, 'input_grad': vjp(dy)[0], 'kernel_grad': vjp(dy)[1]}
  spec = conv.ConvShape(x.shape, w.shape, s, p, g, 'float32')
  assert spec.y == y.shape
  candidates = {'forward': conv._forward_lowerings(spec), 'input_grad': conv._input_grad_lowerings(spec),
                'kernel_grad': conv._kernel_grad_lowerings(spec)}
  for direction, fns in candidates.items():
    for name, fn in fns.items():
      got = jax.jit(fn)(x, w) if direction == 'forward' else jax.jit(fn)(x, w, dy)
      scale = float(jnp.max(jnp.abs(want[direction])))
      np.testing.assert_allclose(got, want[direction], rtol=1e-5, atol=2e-6 * scale,
                                 err_msg=f'{direction} {name}')
  # Dense k x k convolutions have the im2col and tap-sum kernel gradients among their candidates.
  if k > 1 and g == 1:
    assert {'im2col', 'taps'} <= set(candidates['kernel_grad'])


def test_tuned_conv_measures_each_direction_and_matches(tuning_on, monkeypatch):
  monkeypatch.setattr(cpu, 'MIN_TUNED_MACS', 0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 10, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 12))
  ref = lambda a, b: _reference(a, b, 2, 2, 'SAME')
  tuned = lambda a, b: conv.conv2d(a, b, 2, 'SAME', 2, impl='auto')
  ct = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 12))
  want = jax.vjp(ref, x, w)[1](ct)
  got = jax.jit(lambda a, b, c: jax.vjp(tuned, a, b)[1](c))(x, w, ct)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  used = tuning.used_choices()
  key = conv.ConvShape((2, 10, 10, 8), (3, 3, 4, 12), 2, 'SAME', 2, 'float32').key
  assert {f'conv_{d} {key}' for d in ('forward', 'input_grad', 'kernel_grad')} <= set(used)
  assert used[f'conv_kernel_grad {key}']['choice'] in ('xla', 'split', 'taps')
  assert set(used[f'conv_kernel_grad {key}']['ms']) == {'xla', 'split', 'taps'}


def test_small_convolutions_are_not_measured(tuning_on, monkeypatch):
  """Below cpu.MIN_TUNED_MACS the default lowering is taken unmeasured; the same convolution above the
  threshold is measured (so the first half can fail)."""
  assert cpu.active(), 'the tests run on the CPU'
  calls = _count_measurements(monkeypatch)
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  grad = lambda: jax.jit(jax.grad(lambda a: conv.conv2d(a, w, impl='auto').sum()))(x)
  grad()
  assert not calls   # 8*8*36*4 MACs is far below cpu.MIN_TUNED_MACS
  monkeypatch.setattr(cpu, 'MIN_TUNED_MACS', 8 * 8 * 36 * 4)
  grad()
  assert len(calls) == 2   # the forward and the kernel gradient (the input gradient has one candidate)
