"""The train step runs whatever optax transformation it is given, SAM as the paper runs it, and a guard
that keeps the state of a non-finite step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiment
import nfnets
from nfnets.devices import to_host
from test_experiment import assert_trees_close, fake_batch, loss_inputs, run_steps, shared_experiment, tiny_config

KEY = jax.random.PRNGKey(0)  # the tiny config has no stochastic depth or dropout: the key is unused


def loss_fn(xp):
  return lambda p, x, y, h: xp._loss(p, x, y, h, KEY)[0]  # pylint: disable=protected-access


def test_any_optax_chain_trains_with_no_change_to_the_step():
  """AGC + AdamW passed to the Experiment gives, over 3 steps, what plain optax gives on the same
  gradients."""
  tx = optax.chain(nfnets.agc(0.01), optax.adamw(1e-3, weight_decay=1e-2))
  xp = experiment.Experiment(tiny_config(), devices=jax.local_devices()[:1], optimizer=tx)
  state = xp.init_state()
  params = to_host(state.params)
  opt_state = tx.init(params)
  grad = jax.jit(jax.grad(loss_fn(xp)))

  @jax.jit
  def plain_optax(g, opt_state, params):
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for seed in range(3):
    batch = fake_batch(1, xp.per_device_batch, seed=seed)
    state, _ = xp.train_step(state, xp.put_batch(batch))
    params, opt_state = plain_optax(grad(params, *loss_inputs(batch, 0)), opt_state, params)
  # Adam divides by sqrt(nu) ~ |g|: where a gradient is near 0, rounding (the two paths are compiled apart)
  # moves a param by up to ~1% of one step's lr (1e-3); a wrong chain moves it by ~lr.
  assert_trees_close(to_host(state.params), params, rtol=1e-5, atol=3e-5)
  assert_trees_close(to_host(state.opt_state), opt_state, rtol=1e-5, atol=1e-6)


def test_sam_step_matches_the_papers_rule(num_devices=4):
  """One SAM step (App. A.4): each device perturbs the params by rho * g / ||g||, g its own ascent
  gradient on a fraction of its batch spread over it; the descent gradients at the perturbed points are
  averaged over devices and go through AGC and the optimizer. Checked through the new momentum, on 4
  devices (one device is the case without the average)."""
  rho = 0.05
  cfg = tiny_config(**{'optimizer.sam_rho': rho, 'optimizer.sam_batch_fraction': 0.25})
  xp = experiment.Experiment(cfg, devices=jax.local_devices()[:num_devices])
  k = xp.per_device_batch // 4   # 25% of each device's examples, from both halves (MixUp and CutMix)
  np.testing.assert_array_equal(xp.sam_examples, np.arange(k) * 4)
  state = xp.init_state()
  p0, opt0 = to_host(state.params), to_host(state.opt_state)
  batch = fake_batch(num_devices, xp.per_device_batch)
  new, _ = xp.train_step(state, xp.put_batch(batch))

  # The reference, each part jitted: op by op, every leaf's shape would be a compile of its own.
  grad = jax.jit(jax.grad(loss_fn(xp)))
  perturb = jax.jit(lambda p, g: jax.tree.map(lambda a, v: a + rho * v / optax.tree.norm(g), p, g))
  ascents, descents = [], []
  for d in range(num_devices):
    x, y, h = loss_inputs(batch, d, num_devices)
    g = grad(p0, x[::4], y[::4], h[::4])
    ascents.append(g)
    descents.append(grad(perturb(p0, g), x, y, h))
  mean_descent = jax.jit(lambda ds: jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *ds))(descents)
  _, expected = jax.jit(xp.optimizer.update)(mean_descent, opt0, p0)
  assert_trees_close(to_host(new.opt_state), expected, rtol=2e-4, atol=1e-6)
  # The devices' ascent directions really differ (they are not averaged).
  a, b = jax.tree.leaves(ascents[0])[0], jax.tree.leaves(ascents[1])[0]
  assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
  plain = shared_experiment(num_devices)
  without_sam, _ = plain.train_step(plain.init_state(), plain.put_batch(batch))
  trace = lambda s: jax.tree.leaves(to_host(s.opt_state))
  assert max(float(np.abs(a - b).max()) for a, b in zip(trace(new), trace(without_sam))) > 1e-6


def test_sam_with_accumulation_equals_sam_on_the_whole_batch(num_devices=1):
  """SAM's ascent examples are round(fraction x device batch), spread over the whole augmented device batch
  (MixUp and CutMix halves), whatever the accumulation: with grad_accum_steps=2 the step is the step with
  1. An ascent taken from one micro-batch (fewer examples, or other ones) would differ. One device: its
  batch of 16 is the largest, so the spread reaches furthest into the second micro-batch."""
  sam = {'optimizer.sam_rho': 0.05, 'optimizer.sam_batch_fraction': 0.5, 'dataset.augment.mixup_alpha': 0.2,
         'dataset.augment.cutmix': True}
  devices = jax.local_devices()[:num_devices]
  one = experiment.Experiment(tiny_config(**sam), devices=devices)
  two = experiment.Experiment(tiny_config(grad_accum_steps=2, **sam), devices=devices)
  assert len(two.sam_examples) == two.per_device_batch // 2 and two.sam_examples[-1] >= two.micro_batch
  s1, m1 = run_steps(one)
  s2, m2 = run_steps(two)
  assert_trees_close(s1.params, s2.params)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)


def test_non_finite_step_keeps_every_leaf_and_records_the_step():
  xp = shared_experiment(2)
  # float pixels (the step takes them as it takes uint8), so that a NaN can be planted
  state, _ = xp.train_step(xp.init_state(), xp.put_batch(fake_batch(2, xp.per_device_batch, dtype=np.float32)))
  before = to_host(state)
  batch = fake_batch(2, xp.per_device_batch, seed=1, dtype=np.float32)
  batch['images'][xp.per_device_batch, 0, 0, 0] = np.nan   # one pixel on device 1 poisons the mean gradient
  after, metrics = xp.train_step(state, xp.put_batch(batch))
  after = to_host(after)
  assert not np.isfinite(to_host(metrics)['loss'])
  for name in ('params', 'opt_state', 'ema_params'):
    for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(before, name))):
      np.testing.assert_array_equal(a, b)
  assert int(after.bad_step) == 1 and int(after.step) == 2


def test_optimizer_choice_by_config():
  """optimizer.name picks the optimizer behind AGC: AdamW's first update is -lr * sign-like, far from
  SGD's -lr * g (here both at a constant LR of 0.1 and without weight decay)."""
  params = {'NFNet/~/stem_conv0': {'w': jnp.ones((3, 3, 3, 4)), 'gain': jnp.ones((4,))}}
  grads = jax.tree.map(lambda p: 1e-6 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  for name, expected in (('sgd', lambda g: -0.1 * g), ('adamw', lambda g: -0.1 * g / (jnp.abs(g) + 1e-8))):
    cfg = tiny_config(**{'optimizer.name': name, 'optimizer.weight_decay': 0.0, 'optimizer.momentum': 0.0,
                         'optimizer.agc.enabled': False}).optimizer
    tx = nfnets.make_optimizer(cfg, lambda step: 0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      np.testing.assert_allclose(u, expected(g), rtol=1e-4, atol=1e-9)
  with pytest.raises(ValueError, match="optimizer.name='rmsprop' is not one of"):
    nfnets.make_optimizer(tiny_config(**{'optimizer.name': 'rmsprop'}).optimizer, lambda step: 0.1)
