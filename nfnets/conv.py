"""Lowerings of a (possibly grouped) NHWC/HWIO 2-D convolution, chosen per backend.

Every lowering computes the same function as `lax.conv_general_dilated(..., feature_group_count=groups)`;
they differ only in speed:

  'xla'     the native (grouped) convolution; XLA differentiates it. Fastest on GPU/TPU.
  'split'   one dense convolution per group, concatenated; XLA differentiates it.
  'matmul'  1x1 convolutions as a matmul (einsum); k x k convolutions as in 'split'.
  'tapgrad' as 'matmul', but the kernel gradient of k x k convolutions is a sum over the k*k taps of
            (strided slice of the input)^T @ (output gradient) matmuls (custom VJP).
  'auto'    the fastest for `jax.default_backend()`: 'matmul' on CPU, 'xla' elsewhere.

XLA:CPU runs the backward pass of grouped convolutions ~10x slower than the same work as dense
convolutions, and its kernel gradient of dense k x k convolutions at 22-110 GFLOP/s against ~150 for a
matmul; 'matmul' avoids the first and the 1x1 convolutions' overhead (benchmarks/conv_layers.py measures every F0 conv shape).
"""
import functools

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'split', 'matmul', 'tapgrad')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, groups: int = 1) -> str:
  """Maps 'auto' to the fastest lowering for the default backend."""
  del groups  # the CPU choice is the same for grouped and dense convolutions
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; accepted: {IMPLS}')
  if impl != 'auto':
    return impl
  if jax.default_backend() == 'cpu':
    return 'matmul'
  return 'xla'


def _dense(x, w, stride, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=padding, dimension_numbers=_DIMS,
      feature_group_count=groups)


def _split(x, w, stride, padding, groups):
  """One dense convolution per group on its slice of input and output channels."""
  if groups == 1:
    return _dense(x, w, stride, padding)
  cin_g = x.shape[-1] // groups
  cout_g = w.shape[-1] // groups
  outs = [
      _dense(x[..., g * cin_g:(g + 1) * cin_g], w[..., g * cout_g:(g + 1) * cout_g], stride, padding)
      for g in range(groups)
  ]
  return jnp.concatenate(outs, axis=-1)


def _pads(size: int, k: int, stride: int, padding: str):
  """(low, high) padding of one spatial dim, as XLA computes it for 'SAME' (TF-style) or 'VALID'."""
  if padding == 'VALID':
    return 0, 0
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _grouped_matmul(x, w2, groups):
  """x (..., G*Ci) times block-diagonal w2 (Ci, G*Co): y[..., g*Co + d] = sum_c x[..., g*Ci + c] w2[c, g*Co + d]."""
  if groups == 1:
    return jnp.einsum('...c,cd->...d', x, w2)
  ci, co = w2.shape[0], w2.shape[1] // groups
  xg = x.reshape(x.shape[:-1] + (groups, ci))
  wg = w2.reshape(ci, groups, co)
  y = jnp.einsum('...gc,cgd->...gd', xg, wg)
  return y.reshape(x.shape[:-1] + (groups * co,))


def _conv1x1(x, w, stride, padding, groups):
  del padding  # a 1x1 window never reads padding: 'SAME' and 'VALID' agree
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  return _grouped_matmul(x, w[0, 0], groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tapgrad(x, w, stride, padding, groups):
  return _split(x, w, stride, padding, groups)


def _conv_tapgrad_fwd(x, w, stride, padding, groups):
  return _split(x, w, stride, padding, groups), (x, w)


def _conv_tapgrad_bwd(stride, padding, groups, res, dy):
  x, w = res
  _, x_vjp = jax.vjp(lambda x_: _split(x_, w, stride, padding, groups), x)
  (dx,) = x_vjp(dy)
  kh, kw, ci, co = w.shape
  _, ho, wo, _ = dy.shape
  (ph0, ph1), (pw0, pw1) = (_pads(x.shape[1], kh, stride, padding),
                            _pads(x.shape[2], kw, stride, padding))
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  cog = co // groups
  dyg = dy.reshape(dy.shape[:-1] + (groups, cog))
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      xs = xs.reshape(xs.shape[:-1] + (groups, ci))
      # (G, Ci, Co/G) -> (Ci, G * Co/G): output channel g*Co/G + d belongs to group g.
      t = jnp.einsum('nhwgc,nhwgd->cgd', xs, dyg)
      taps.append(t.reshape(ci, co))
  dw = jnp.stack(taps).reshape(kh, kw, ci, co)
  return dx, dw.astype(w.dtype)


_conv_tapgrad.defvjp(_conv_tapgrad_fwd, _conv_tapgrad_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: str = 'SAME', groups: int = 1,
           impl: str = 'auto') -> jax.Array:
  """NHWC convolution with an HWIO kernel of shape (kh, kw, C_in // groups, C_out)."""
  impl = resolve_impl(impl, groups)
  if impl == 'xla':
    return _dense(x, w, stride, padding, groups)
  if impl == 'split':
    return _split(x, w, stride, padding, groups)
  if w.shape[:2] == (1, 1):  # 'matmul' and 'tapgrad'
    return _conv1x1(x, w, stride, padding, groups)
  if impl == 'matmul' or padding not in ('SAME', 'VALID'):
    return _split(x, w, stride, padding, groups)
  return _conv_tapgrad(x, w, stride, padding, groups)
