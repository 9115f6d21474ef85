"""Lowerings of a (possibly grouped) NHWC/HWIO 2-D convolution, chosen per backend and, on CPU, measured.

Every lowering computes the same function as `lax.conv_general_dilated(..., feature_group_count=groups)`;
they differ only in speed:

  'xla'     the native (grouped) convolution; XLA differentiates it. Fastest on GPU/TPU.
  'split'   one dense convolution per group, concatenated; XLA differentiates it.
  'matmul'  1x1 convolutions as a matmul (einsum); k x k convolutions as in 'split'.
  'tapgrad' as 'matmul', but the kernel gradient of k x k convolutions is a sum over the k*k taps of
            (strided slice of the input)^T @ (output gradient) matmuls (custom VJP).
  'auto'    'xla' on GPU/TPU. On CPU, each direction of each convolution shape (the forward, the input
            gradient, the kernel gradient) gets its own lowering, chosen by `nfnets.cpu.conv_lowering`
            among the candidates below: XLA's convolution, one convolution per group, matmuls for 1x1
            convolutions, and for dense k x k convolutions im2col matmuls (patches @ kernel,
            patches^T @ output gradient) and the tap sum.

Why several lowerings: XLA:CPU runs the backward pass of grouped convolutions much slower than the same work
as dense convolutions, and the best form of a kernel gradient changes with the CPU and the XLA version
(benchmarks/conv_layers.py measures every F0 convolution under each lowering; docs/performance.md).
"""
import functools
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import cpu

IMPLS = ('auto', 'xla', 'split', 'matmul', 'tapgrad')
_DIMS = ('NHWC', 'HWIO', 'NHWC')
_DIRECTIONS = ('forward', 'input_grad', 'kernel_grad')


def resolve_impl(impl: str, groups: int = 1) -> str:
  """Maps 'auto' to the lowering for the default backend: 'tuned' (measured per direction) on CPU."""
  del groups  # the CPU choice is made per shape, grouped or not
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv_impl {impl!r}; accepted: {IMPLS}')
  if impl != 'auto':
    return impl
  return 'tuned' if cpu.active() else 'xla'


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


def _patches(x, kh, kw, stride, padding):
  """[N, Ho, Wo, C*kh*kw] im2col patches; the feature index is (c, i, j), c major."""
  return jax.lax.conv_general_dilated_patches(x, (kh, kw), (stride, stride), padding, dimension_numbers=_DIMS)


def _im2col(x, w, stride, padding):
  """A dense k x k convolution as one matmul of im2col patches with the kernel."""
  kh, kw, ci, co = w.shape
  w2 = jnp.transpose(w, (2, 0, 1, 3)).reshape(ci * kh * kw, co)
  return jnp.einsum('nhwk,kd->nhwd', _patches(x, kh, kw, stride, padding), w2)


def _kernel_grad_im2col(x, dy, w_shape, stride, padding):
  """Kernel gradient of a dense k x k convolution: patches^T @ output gradient, one matmul."""
  kh, kw, ci, co = w_shape
  dw = jnp.einsum('nhwk,nhwd->kd', _patches(x, kh, kw, stride, padding), dy)
  return jnp.transpose(dw.reshape(ci, kh, kw, co), (1, 2, 0, 3))


def _kernel_grad_taps(x, dy, w_shape, stride, padding, groups):
  """Kernel gradient as a sum over the k*k taps of (strided input slice)^T @ (output gradient)."""
  kh, kw, ci, co = w_shape
  _, ho, wo, _ = dy.shape
  (ph0, ph1), (pw0, pw1) = (_pads(x.shape[1], kh, stride, padding),
                            _pads(x.shape[2], kw, stride, padding))
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  dyg = dy.reshape(dy.shape[:-1] + (groups, co // groups))
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      xs = xs.reshape(xs.shape[:-1] + (groups, ci))
      # (G, Ci, Co/G) -> (Ci, G * Co/G): output channel g*Co/G + d belongs to group g.
      taps.append(jnp.einsum('nhwgc,nhwgd->cgd', xs, dyg).reshape(ci, co))
  return jnp.stack(taps).reshape(kh, kw, ci, co)


class ConvShape(NamedTuple):
  """What a lowering's speed depends on: shapes, stride, padding, groups and dtype."""
  x: tuple
  w: tuple
  stride: int
  padding: str
  groups: int
  dtype: str

  @property
  def key(self) -> str:
    return (f"x{'x'.join(map(str, self.x))} k{self.w[0]}x{self.w[1]} {self.w[2]}->{self.w[3]} "
            f"s{self.stride} {self.padding} g{self.groups} {self.dtype}")

  @property
  def y(self) -> tuple:
    n, h, w_, _ = self.x
    kh, kw = self.w[:2]
    if self.padding == 'SAME':
      return (n, -(-h // self.stride), -(-w_ // self.stride), self.w[3])
    return (n, (h - kh) // self.stride + 1, (w_ - kw) // self.stride + 1, self.w[3])

  @property
  def macs(self) -> int:
    return int(np.prod(self.y)) * int(np.prod(self.w[:3]))

  @property
  def is_1x1(self) -> bool:
    return tuple(self.w[:2]) == (1, 1)


def _forward_lowerings(s: ConvShape) -> Dict[str, Callable]:
  """name -> f(x, w), each the same convolution."""
  c = {'xla': lambda x, w: _dense(x, w, s.stride, s.padding, s.groups)}
  if s.groups > 1:
    c['split'] = lambda x, w: _split(x, w, s.stride, s.padding, s.groups)
  if s.is_1x1:
    c['matmul'] = lambda x, w: _conv1x1(x, w, s.stride, s.padding, s.groups)
  elif s.groups == 1 and s.padding in ('SAME', 'VALID'):
    c['im2col'] = lambda x, w: _im2col(x, w, s.stride, s.padding)
  return c


def _vjp_of(forward: Callable, wrt: int) -> Callable:
  """The input (wrt=0) or kernel (wrt=1) gradient f(x, w, dy) of a lowering. (XLA drops the unused
  forward; taking the VJP at the real x and w keeps their sharding types inside shard_map.)"""
  return lambda x, w, dy: jax.vjp(forward, x, w)[1](dy)[wrt]


def _input_grad_lowerings(s: ConvShape) -> Dict[str, Callable]:
  """name -> f(x, w, dy) = d(sum(y * dy))/dx."""
  return {name: _vjp_of(f, 0) for name, f in _forward_lowerings(s).items() if name != 'im2col'}


def _kernel_grad_lowerings(s: ConvShape) -> Dict[str, Callable]:
  """name -> f(x, w, dy) = d(sum(y * dy))/dw."""
  c = {name: _vjp_of(f, 1) for name, f in _forward_lowerings(s).items() if name != 'im2col'}
  if not s.is_1x1 and s.padding in ('SAME', 'VALID'):
    c['taps'] = lambda x, w, dy: _kernel_grad_taps(x, dy, s.w, s.stride, s.padding, s.groups)
    if s.groups == 1:
      c['im2col'] = lambda x, w, dy: _kernel_grad_im2col(x, dy, s.w, s.stride, s.padding)
  return c


def _lowering(direction: str, s: ConvShape, candidates: Dict[str, Callable], arg_shapes,
              fixed: Optional[Tuple[str, str, str]]) -> Callable:
  """The lowering of one direction: `fixed[direction]` when given, else XLA:CPU's measured choice."""
  if fixed is not None:
    return candidates[fixed[_DIRECTIONS.index(direction)]]
  dtype = jnp.dtype(s.dtype)
  make_args = lambda: cpu.tuning.random_args(*[(shape, dtype) for shape in arg_shapes])
  return candidates[cpu.conv_lowering(direction, s, candidates, make_args)]


def _shape_of(x, w, stride, padding, groups) -> ConvShape:
  return ConvShape(tuple(x.shape), tuple(w.shape), stride, padding, groups, jnp.dtype(x.dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_per_direction(x, w, stride, padding, groups, fixed):
  """A convolution whose forward, input gradient and kernel gradient each have their own lowering:
  `fixed` (forward, input_grad, kernel_grad) names, or None for XLA:CPU's measured choice of each."""
  s = _shape_of(x, w, stride, padding, groups)
  return _lowering('forward', s, _forward_lowerings(s), (s.x, s.w), fixed)(x, w)


def _conv_per_direction_fwd(x, w, stride, padding, groups, fixed):
  return _conv_per_direction(x, w, stride, padding, groups, fixed), (x, w)


def _conv_per_direction_bwd(stride, padding, groups, fixed, res, dy):
  x, w = res
  s = _shape_of(x, w, stride, padding, groups)
  dx = _lowering('input_grad', s, _input_grad_lowerings(s), (s.x, s.w, s.y), fixed)(x, w, dy)
  dw = _lowering('kernel_grad', s, _kernel_grad_lowerings(s), (s.x, s.w, s.y), fixed)(x, w, dy)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_per_direction.defvjp(_conv_per_direction_fwd, _conv_per_direction_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: str = 'SAME', groups: int = 1,
           impl: str = 'auto') -> jax.Array:
  """NHWC convolution with an HWIO kernel of shape (kh, kw, C_in // groups, C_out)."""
  impl = resolve_impl(impl, groups)
  if impl == 'tuned':
    return _conv_per_direction(x, w, stride, padding, groups, None)
  if impl == 'xla':
    return _dense(x, w, stride, padding, groups)
  if impl == 'split':
    return _split(x, w, stride, padding, groups)
  if w.shape[:2] == (1, 1):  # 'matmul' and 'tapgrad'
    return _conv1x1(x, w, stride, padding, groups)
  if impl == 'matmul' or padding not in ('SAME', 'VALID'):
    return _split(x, w, stride, padding, groups)
  per_group = 'split' if groups > 1 else 'xla'   # 'tapgrad': as 'matmul', but the tap-sum kernel gradient
  return _conv_per_direction(x, w, stride, padding, groups, (per_group, per_group, 'taps'))
