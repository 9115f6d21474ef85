"""Lowerings of a (possibly grouped) NHWC/HWIO 2-D convolution, chosen per backend.

Every lowering computes the same function as `lax.conv_general_dilated(..., feature_group_count=groups)`;
they differ only in speed. XLA:CPU runs the backward pass of grouped convolutions far slower than the same
work as dense convolutions, so on CPU the groups are split; on GPU/TPU the native grouped conv is used.
"""
import jax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'split')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str, groups: int) -> str:
  """Maps 'auto' to the fastest lowering for the default backend."""
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; accepted: {IMPLS}')
  if impl != 'auto':
    return impl
  if groups > 1 and jax.default_backend() == 'cpu':
    return 'split'
  return 'xla'


def _dense(x, w, stride, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=padding, dimension_numbers=_DIMS,
      feature_group_count=groups)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: str = 'SAME', groups: int = 1,
           impl: str = 'auto') -> jax.Array:
  """NHWC convolution with an HWIO kernel of shape (kh, kw, C_in // groups, C_out)."""
  impl = resolve_impl(impl, groups)
  if impl == 'xla' or groups == 1:
    return _dense(x, w, stride, padding, groups)
  # 'split': one dense convolution per group on its slice of input and output channels.
  cin_g = x.shape[-1] // groups
  cout_g = w.shape[-1] // groups
  outs = [
      _dense(x[..., g * cin_g:(g + 1) * cin_g], w[..., g * cout_g:(g + 1) * cout_g], stride, padding)
      for g in range(groups)
  ]
  return jnp.concatenate(outs, axis=-1)
