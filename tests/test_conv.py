"""Every conv lowering equals lax.conv_general_dilated(feature_group_count=g) in value and gradients."""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets
from nfnets import conv
from nfnets import cpu
from test_predict_finetune import random_params

LOWERINGS = [i for i in conv.IMPLS if i != 'auto']
# (H, W, C_in, C_out, k, stride, groups, padding): grouped/dense, 1x1/3x3/5x5, strides 1/2,
# odd and even sizes (TF-style asymmetric 'SAME' padding at stride 2), 'VALID'.
SHAPES = [
    (9, 9, 8, 12, 3, 1, 2, 'SAME'),
    (10, 10, 8, 12, 3, 2, 2, 'SAME'),
    (11, 7, 12, 12, 3, 2, 3, 'SAME'),
    (11, 11, 6, 6, 3, 2, 3, 'VALID'),
    (12, 12, 3, 16, 3, 2, 1, 'SAME'),
    (8, 8, 4, 8, 5, 1, 1, 'SAME'),
    (8, 8, 16, 8, 1, 1, 1, 'SAME'),
    (9, 9, 4, 8, 1, 2, 2, 'SAME'),
    (6, 6, 8, 8, 1, 1, 4, 'VALID'),
]


def reference(x, w, stride, padding, groups):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)


def value_and_grads(fn, x, w, ct):
  y, vjp = jax.vjp(fn, x, w)
  return (y,) + vjp(ct)


@pytest.mark.parametrize('impl', LOWERINGS)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_lowering_matches_grouped_conv(impl, shape):
  h, w_, cin, cout, k, stride, groups, padding = shape
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, h, w_, cin))
  w = jax.random.normal(kw, (k, k, cin // groups, cout))
  want = value_and_grads(lambda a, b: reference(a, b, stride, padding, groups), x, w,
                         jax.random.normal(kc, reference(x, w, stride, padding, groups).shape))
  ct = jax.random.normal(kc, want[0].shape)
  fn = jax.jit(functools.partial(conv.conv2d, stride=stride, padding=padding, groups=groups, impl=impl))
  got = value_and_grads(fn, x, w, ct)
  for name, a, b in zip(('value', 'd_input', 'd_kernel'), got, want):
    assert a.shape == b.shape, name
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * scale, err_msg=f'{impl} {name}')


def test_auto_resolves_per_backend(monkeypatch):
  assert conv.resolve_impl('auto', 6) == 'tuned'   # tests run on the CPU: XLA:CPU's choice per direction
  assert conv.resolve_impl('split', 6) == 'split'   # an explicit choice is kept
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert conv.resolve_impl('auto', 6) == 'xla'
  with pytest.raises(ValueError, match="accepted: .*'split'"):
    conv.resolve_impl('im2col', 1)


def _nets(name):
  return {i: hk.transform(lambda x, i=i: nfnets.create_model(name, 10, conv_impl=i, drop_rate=0.0,
                                                             stochdepth_rate=0.0)(x, True))
          for i in ('xla', 'auto')}


def _params_with_open_residuals(name):
  """Random params made on the host (compiling the init of F0 would take longer than the test); their skip
  gains are 1, so the residual branches (where the grouped convs are) reach the logits."""
  return random_params(name, 10)


def test_model_value_and_grad_equal_across_lowerings(monkeypatch):
  """nfnet_tiny (grouped 3x3 and 1x1 convs) and its gradient are the same function under 'auto', whichever
  candidate XLA:CPU's choice takes for each direction: taking the 1st, 2nd and 3rd (in name order) in
  turn reaches every candidate, im2col and the tap sum included."""
  rank, chosen = [0], set()

  def choose(direction, shape, candidates, make_args):
    del shape, make_args
    name = sorted(candidates)[rank[0] % len(candidates)]
    chosen.add(f'{direction}:{name}')
    return name

  monkeypatch.setattr(cpu, 'conv_lowering', choose)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  nets = _nets('nfnet_tiny')
  params = _params_with_open_residuals('nfnet_tiny')
  value_and_grad = lambda net: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(net.apply(p, None, x) ** 2),
                                                          argnums=(0, 1)))(params, images)
  l0, (gp0, gx0) = value_and_grad(nets['xla'])
  for rank[0] in range(3):
    l1, (gp1, gx1) = value_and_grad(nets['auto'])
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(gx0))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp1), jax.tree.leaves(gp0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-12,
                                 err_msg=f'choice {rank[0]} ' + jax.tree_util.keystr(path))
  every = {f'{d}:{n}' for d in ('forward', 'input_grad', 'kernel_grad') for n in ('xla', 'split', 'matmul')}
  assert {'forward:im2col', 'kernel_grad:im2col', 'kernel_grad:taps'} | every <= chosen, sorted(chosen)


def test_f0_forward_equal_across_lowerings():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  nets = _nets('F0')
  params = _params_with_open_residuals('F0')
  l0, l1 = (jax.jit(net.apply)(params, None, images) for net in nets.values())
  np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(l0))))
