"""AGC against an independent NumPy implementation of eq. 3, optimizer masks and the LR schedule."""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
import nfnets
from nfnets import param_groups


def numpy_agc(g, p, clipping, eps):
  """Paper eq. 3, written from scratch in NumPy: units are output channels (last axis) for rank >= 2."""
  g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
  if g.ndim <= 1:
    g_n, p_n = np.linalg.norm(g), np.linalg.norm(p)
    bound = clipping * max(p_n, eps)
    return g * (bound / max(g_n, 1e-6)) if g_n > bound else g
  out = g.copy()
  for o in range(g.shape[-1]):
    g_n, p_n = np.linalg.norm(g[..., o]), np.linalg.norm(p[..., o])
    bound = clipping * max(p_n, eps)
    if g_n > bound:
      out[..., o] = g[..., o] * bound / max(g_n, 1e-6)
  return out


def random_tree(seed):
  rng = np.random.default_rng(seed)
  shapes = {'conv': (3, 3, 16, 8), 'grouped_conv': (3, 3, 4, 12), 'linear': (10, 6), 'gain': (8,),
            'skip_gain': (), 'zero_conv': (1, 1, 4, 5)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  params['zero_conv'][:] = 0  # zero-initialised: eps lets it move
  params['skip_gain'] = np.zeros((), np.float32)
  # Gradients whose scale varies per unit, so some units clip and others do not.
  grads = {k: np.asarray(rng.normal(size=s) * rng.choice([1e-4, 1e-2, 1.0], size=s[-1:] if s else ()),
                        np.float32) for k, s in shapes.items()}
  return params, grads


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('clipping', [0.01, 0.16])
def test_agc_matches_numpy_reference(seed, clipping):
  params, grads = random_tree(seed)
  tx = nfnets.agc(clipping, eps=1e-3)
  out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
  n_clipped = 0
  for k in params:
    ref = numpy_agc(grads[k], params[k], clipping, 1e-3)
    np.testing.assert_allclose(np.asarray(out[k]), ref, rtol=2e-5, atol=1e-9, err_msg=k)
    n_clipped += int(not np.allclose(ref, grads[k]))
  assert n_clipped > 0  # the tree exercises the clipping branch


def test_agc_never_increases_norms_and_passes_small_grads():
  params, grads = random_tree(3)
  tx = nfnets.agc(0.02)
  out, _ = tx.update(grads, tx.init(params), params)
  for k in params:
    g, o = np.asarray(grads[k]), np.asarray(out[k])
    axes = tuple(range(g.ndim - 1)) if g.ndim >= 2 else None
    g_n, o_n = np.sqrt((g ** 2).sum(axis=axes)), np.sqrt((o ** 2).sum(axis=axes))
    assert np.all(o_n <= g_n * (1 + 1e-6))
  tiny = jax.tree.map(lambda g: jnp.asarray(g) * 1e-9, grads)
  out, _ = tx.update(tiny, tx.init(params), params)
  for k in params:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tiny[k]))


def test_clip_fraction_counts_units():
  params = {'a': jnp.ones((2, 4)), 'b': jnp.ones((3,))}
  grads = {'a': jnp.array([[1.0, 0, 0, 1.0], [0, 0, 0, 0]]), 'b': jnp.zeros((3,))}
  # Units of 'a': 4 columns with ||W|| = sqrt(2); two have ||G|| = 1 > 0.1*sqrt(2). 'b' is one unit.
  assert float(nfnets.clip_fraction(grads, params, 0.1)) == pytest.approx(2 / 5)
  assert float(nfnets.clip_fraction(grads, params, 0.1, mask={'a': False, 'b': True})) == 0.0


@pytest.mark.parametrize('bad', [dict(clipping=0.0), dict(clipping=-1), dict(eps=0.0), dict(eps=-1e-3)])
def test_agc_rejects_non_positive(bad):
  kw = dict(clipping=0.01, eps=1e-3)
  kw.update(bad)
  with pytest.raises(ValueError, match=f'must be a positive number, got {list(bad.values())[0]}'):
    nfnets.agc(**kw)


@functools.cache
def tiny_params():
  f = hk.transform(lambda x: nfnets.create_model('nfnet_tiny', 10)(x, is_training=True))
  return jax.jit(f.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))  # one compile, not one per op


def test_masks_by_name():
  params = tiny_params()
  wd = nfnets.weight_decay_mask(params)
  clip = nfnets.agc_mask(params)
  assert wd['NFNet/~/linear']['w'] and not wd['NFNet/~/linear']['b']
  assert not wd['NFNet/~/nf_block']['skip_gain']
  assert wd['NFNet/~/stem_conv0']['w'] and not wd['NFNet/~/stem_conv0']['gain']
  assert not wd['NFNet/~/stem_conv0']['bias']
  se = 'NFNet/~/nf_block/~/squeeze_excite/~/linear'
  assert wd[se]['w'] and not wd[se]['b']
  # AGC: everything except the classifier weight (its bias is clipped, as in the reference).
  unclipped = [(m, n) for m, ps in clip.items() for n, v in ps.items() if not v]
  assert unclipped == [('NFNet/~/linear', 'w')]


def opt_config(**kw):
  """The base recipe's optimizer config (paper App. A.1), with overrides."""
  c = base.get_config().optimizer
  c.update(kw)
  return c


def test_lr_schedule_matches_reference_values():
  sched = nfnets.make_schedule(opt_config(), batch_size=4096, training_steps=112_602,
                               num_train_examples=1_281_167)
  expected = {0: 0.0, 1: 0.001023, 100: 0.1023, 1563: 1.59905, 1564: 1.6, 50000: 0.9592}
  for step, lr in expected.items():
    assert float(sched(step)) == pytest.approx(lr, rel=2e-4, abs=1e-9), step
  assert float(sched(112_601)) < 1e-6


def test_optimizer_leaves_classifier_unclipped_and_matches_manual_update():
  params = tiny_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 5.0), params)  # huge: every clipped unit clips
  sched = lambda step: 0.5
  tx = nfnets.make_optimizer(opt_config(), sched)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  wd, m = 2e-5, 0.9
  for mod, ps in params.items():
    for name, p in ps.items():
      g = np.asarray(grads[mod][name], np.float64)
      pn = np.asarray(p, np.float64)
      if not param_groups.is_classifier_weight(mod, name):
        g = numpy_agc(g, pn, 0.01, 1e-3)
      if not param_groups.is_gain_or_bias(mod, name):
        g = g + wd * pn
      # Nesterov on the first step: buf = g; update = g + m * buf.
      expected = -0.5 * (g + m * g)
      np.testing.assert_allclose(np.asarray(updates[mod][name]), expected, rtol=1e-4, atol=1e-10,
                                 err_msg=f'{mod}/{name}')
  # The classifier weight is the only weight whose update keeps the full gradient.
  assert abs(float(updates['NFNet/~/linear']['w'][0, 0])) == pytest.approx(0.5 * 1.9 * (5 + 2e-5 * float(
      params['NFNet/~/linear']['w'][0, 0])), rel=1e-5)


def test_agc_disabled_by_config():
  params = tiny_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 5.0), params)
  tx = nfnets.make_optimizer(opt_config(agc=dict(enabled=False, clipping=0.01, eps=1e-3),
                                        weight_decay=0.0, momentum=0.0), lambda s: 1.0)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(u), -np.asarray(g))
