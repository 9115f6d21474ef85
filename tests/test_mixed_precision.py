"""bf16 compute with f32 master params, optimizer state and EMA (paper App. A.1) stays close to f32 training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import experiment
from nfnets.devices import to_host
from test_experiment import NFNET_TINY, fake_batch, loss_inputs, run_steps, tiny_config

STEPS = 3


@functools.cache
def bf16_experiment():
  """nfnet_tiny on one device, bf16 compute: built once for both tests (its programs are the slow part)."""
  return experiment.Experiment(tiny_config(dtype='bfloat16', **NFNET_TINY), devices=jax.local_devices()[:1])


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_forward_f32_state():
  xp = bf16_experiment()
  b = fake_batch(1, xp.per_device_batch)
  params = to_host(xp.init_state()).params
  jaxpr = str(jax.make_jaxpr(xp._loss)(params, *loss_inputs(b, 0), jax.random.PRNGKey(0)))
  convs = [line for line in jaxpr.splitlines() if 'conv_general_dilated' in line]
  assert convs and all('bf16' in line for line in convs), convs[:3]   # the convolutions really run in bf16
  state, metrics = run_steps(xp, steps=1)
  assert _dtypes(state.params) == _dtypes(state.ema_params) == _dtypes(state.opt_state) == {'float32'}
  assert all(np.asarray(v).dtype == np.float32 for k, v in metrics.items() if k != 'lr')


def test_bf16_stays_close_to_f32():
  """Same init, same batches, STEPS steps: bf16 vs f32.

  bf16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2% per value); losses and gradients are sums
  of many such products, so errors of ~0.1-1% in the loss and gradient norm and a few % in the parameter
  *updates* are expected (the params differ far less: the shared init dominates them). Measured here:
  loss 2.30327 vs 2.30342 (7e-5 relative), grad norm +0.4%, update error 3.9%, max |param diff| 2e-4. The
  bounds are ~2.5-70x those; bf16 master params or optimizer state would fail the dtype test above.
  """
  xp32 = experiment.Experiment(tiny_config(dtype='float32', **NFNET_TINY), devices=jax.local_devices()[:1])
  xp16 = bf16_experiment()
  init = to_host(xp32.init_state()).params
  s32, m32 = run_steps(xp32, steps=STEPS)
  s16, m16 = run_steps(xp16, steps=STEPS)

  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=5e-3)
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=3e-2)
  leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  p0, p32, p16 = leaves(init), leaves(s32.params), leaves(s16.params)
  update_err = np.linalg.norm((p16 - p0) - (p32 - p0)) / np.linalg.norm(p32 - p0)
  param_err = np.max(np.abs(p16 - p32))
  print(f'loss f32 {float(m32["loss"]):.6f} bf16 {float(m16["loss"]):.6f}; grad norm f32 '
        f'{float(m32["grad_norm"]):.6f} bf16 {float(m16["grad_norm"]):.6f}; relative update error '
        f'{update_err:.4f}; max |param diff| {param_err:.2e}')
  assert 0 < update_err < 0.1          # close, but bf16 really changed the arithmetic
  assert param_err < 1e-3
  e32, e16 = leaves(s32.ema_params), leaves(s16.ema_params)
  assert np.linalg.norm(e16 - e32) / np.linalg.norm(e32 - p0) < 0.1
