"""Adaptive Gradient Clipping (Brock et al. 2021, eq. 3) as an optax GradientTransformation.

For each unit i (one output unit: a conv kernel's H, W, I slice; a linear kernel's input column; a whole
vector or scalar), G_i is rescaled to lambda * max(||W_i||, eps) / ||G_i|| * G_i whenever
||G_i|| exceeds lambda * max(||W_i||, eps). Zero-initialised params (skip_gain) can move thanks to eps.
"""
import jax
import jax.numpy as jnp
import optax


def _check_positive(name, value):
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
    raise ValueError(f'AGC {name} must be a positive number, got {value!r}')


def agc(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
  """Unit-wise adaptive gradient clipping; `update(grads, state, params)` needs params.

  optax's `adaptive_grad_clip` implements the reference formula (unit norms over HWI for HWIO conv
  kernels, over I for IO linear kernels, whole tensor for vectors and scalars; a 1e-6 floor on ||G||),
  so this validates the arguments and delegates to it. Exclude the classifier with `optax.masked`.
  """
  _check_positive('clipping', clipping)
  _check_positive('eps', eps)
  return optax.adaptive_grad_clip(clipping, eps)


def unit_axes(x) -> tuple:
  """Axes that hold one unit of a parameter: all but the last for rank >= 2, all for vectors/scalars."""
  return tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))


def clip_fraction(grads, params, clipping: float, eps: float = 1e-3, mask=None) -> jax.Array:
  """Fraction of units (over the whole tree, masked-out leaves excluded) whose gradient AGC clips."""
  def per_leaf(g, p):
    g_n = jnp.sqrt(jnp.sum(jnp.square(g), axis=unit_axes(g)))
    p_n = jnp.sqrt(jnp.sum(jnp.square(p), axis=unit_axes(p)))
    clipped = g_n > clipping * jnp.maximum(p_n, eps)
    return jnp.sum(clipped), clipped.size

  leaves_g = jax.tree.leaves(grads)
  leaves_p = jax.tree.leaves(params)
  leaves_m = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves_g)
  counts = [per_leaf(g, p) for g, p, m in zip(leaves_g, leaves_p, leaves_m) if m]
  total = sum(n for _, n in counts)
  return sum(c for c, _ in counts) / max(total, 1)
