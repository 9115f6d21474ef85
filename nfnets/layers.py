"""Normalizer-free building blocks: scaled WS conv, squeeze-excite, stochastic depth, gamma activations.

Parameter names match DeepMind's released Haiku checkpoints (`w`, `gain`, `bias`; SE `linear`/`linear_1`).
"""
from typing import Callable, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import conv as conv_lib

# Empirical gammas from the reference code (deepmind-research nfnets/base.py, `nonlinearities`):
# gamma * act(x) has unit variance for x ~ N(0, 1).
# The code's constants, not the analytic ones, are kept so released weights behave identically.
ACTIVATION_GAMMAS = {
    'identity': 1.0,
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'glu': 1.8484294414520264,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'log_softmax': 1.0002083778381348,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'soft_sign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}

_RAW_ACTIVATIONS = {
    'identity': lambda x: x,
    'celu': jax.nn.celu,
    'elu': jax.nn.elu,
    # The reference uses jax.nn.gelu's default, the tanh approximation.
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),
    'glu': jax.nn.glu,
    'leaky_relu': jax.nn.leaky_relu,
    'log_sigmoid': jax.nn.log_sigmoid,
    'log_softmax': jax.nn.log_softmax,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'soft_sign': jax.nn.soft_sign,
    'softplus': jax.nn.softplus,
    'tanh': jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns `gamma * act(x)` for an activation name (the variance-preserving form)."""
  if name not in ACTIVATION_GAMMAS:
    raise ValueError(f'Unknown activation {name!r}; accepted: {sorted(ACTIVATION_GAMMAS)}')
  fn, gamma = _RAW_ACTIVATIONS[name], ACTIVATION_GAMMAS[name]
  return lambda x: fn(x) * gamma


def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
  """Scaled weight standardisation: gain * (w - mean) / sqrt(max(fan_in * var, eps)) per output unit."""
  fan_in = 1
  for d in w.shape[:-1]:
    fan_in *= d
  mean = jnp.mean(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
  var = jnp.var(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  # Same arithmetic order as the reference (w*scale - mean*scale), for bit-level parity.
  return w * scale - mean * scale


class WSConv2D(hk.Module):
  """2-D convolution with scaled weight standardisation, a learnable gain and a bias (NHWC / HWIO).

  Args:
    conv_impl: how a grouped convolution is lowered (see `nfnets.conv`); 'auto' picks per backend.
  """

  def __init__(self, output_channels: int, kernel_shape: Union[int, Sequence[int]], stride: int = 1,
               padding: str = 'SAME', feature_group_count: int = 1, eps: float = 1e-4,
               conv_impl: str = 'auto', name: Optional[str] = None):
    super().__init__(name=name)
    if isinstance(kernel_shape, int):
      kernel_shape = (kernel_shape, kernel_shape)
    self.output_channels = output_channels
    self.kernel_shape = tuple(kernel_shape)
    self.stride = stride
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.eps = eps
    self.conv_impl = conv_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    in_ch = x.shape[-1]
    if in_ch % self.feature_group_count:
      raise ValueError(f'Input channels {in_ch} not divisible by groups {self.feature_group_count}')
    w_shape = self.kernel_shape + (in_ch // self.feature_group_count, self.output_channels)
    w = hk.get_parameter('w', w_shape, x.dtype,
                         init=hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal'))
    gain = hk.get_parameter('gain', (self.output_channels,), x.dtype, init=jnp.ones)
    bias = hk.get_parameter('bias', (self.output_channels,), x.dtype, init=jnp.zeros)
    w_hat = standardize_weight(w, gain, self.eps)
    out = conv_lib.conv2d(x, w_hat, stride=self.stride, padding=self.padding,
                          groups=self.feature_group_count, impl=self.conv_impl)
    return out + bias


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite: mean over H, W -> linear -> act -> linear -> sigmoid, broadcast over H, W.

  The hidden activation is unscaled ReLU, as in the reference code that produced the released weights.
  """

  def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5, hidden_ch: Optional[int] = None,
               activation_fn: Callable[[jax.Array], jax.Array] = jax.nn.relu, name: Optional[str] = None):
    super().__init__(name=name)
    self.hidden_ch = hidden_ch if hidden_ch is not None else max(1, int(in_ch * se_ratio))
    self.activation_fn = activation_fn
    self.fc0 = hk.Linear(self.hidden_ch, with_bias=True)
    self.fc1 = hk.Linear(out_ch, with_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(self.activation_fn(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None]


class StochDepth(hk.Module):
  """Batch-wise stochastic depth: drops each example's residual branch with probability `drop_rate`.

  No 1/keep rescaling (reference `scale_by_keep=False`); the identity when not training.
  """

  def __init__(self, drop_rate: float, name: Optional[str] = None):
    super().__init__(name=name)
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    if not is_training or self.drop_rate <= 0:
      return x
    keep = 1.0 - self.drop_rate
    r = jax.random.uniform(hk.next_rng_key(), (x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)
    return x * jnp.floor(keep + r)


def check_images(x: jax.Array) -> None:
  """Raises ValueError unless `x` is a rank-4 NHWC batch."""
  if getattr(x, 'ndim', None) != 4:
    raise ValueError(f'Expected rank-4 NHWC images, got shape {getattr(x, "shape", None)}')


def signal_metrics(x: jax.Array) -> dict:
  """Signal-propagation statistics of an NHWC activation: channel squared mean and channel variance."""
  return {
      'avg_sq_mean': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
      'avg_var': jnp.mean(jnp.var(x, axis=(0, 1, 2))),
  }


def residual_join(branch, shortcut, alpha: float, stoch_depth: 'StochDepth', is_training: bool,
                  skip_gain_init: float = 0.0):
  """Ends a residual block: `shortcut + alpha * skip_gain * stochdepth(branch)`.

  Called inside a block's `__call__`, so `skip_gain` (a scalar, by default initialised to 0 as in the
  paper (SkipInit), making every block the identity at init) belongs to that block. Also returns the
  branch variance for signal-propagation plots.
  """
  res_avg_var = jnp.mean(jnp.var(branch, axis=(0, 1, 2)))
  if 0 < stoch_depth.drop_rate < 1:
    branch = stoch_depth(branch, is_training)
  skip_gain = hk.get_parameter('skip_gain', (), branch.dtype, init=hk.initializers.Constant(skip_gain_init))
  return branch * skip_gain * alpha + shortcut, res_avg_var


def global_pool(x: jax.Array) -> jax.Array:
  """Global average pool over H, W: the [B, C] vector the classifier reads."""
  return jnp.mean(x, axis=(1, 2))


def dropout(x: jax.Array, drop_rate: float, is_training: bool) -> jax.Array:
  """Dropout before the classifier, train only (reference `NFNet.__call__`)."""
  if is_training and drop_rate > 0:
    x = hk.dropout(hk.next_rng_key(), drop_rate, x)
  return x


def run_blocks(blocks, x, is_training: bool, return_metrics: bool, remat: bool = False):
  """Applies residual blocks in order; collects per-block signal-propagation metrics when asked.

  Each block returns `(output, residual_branch_variance)`. Metrics are arrays of length len(blocks).
  With `remat`, each block's activations are recomputed in the backward pass instead of stored.
  """
  metrics = {'avg_sq_mean': [], 'avg_var': [], 'res_avg_var': []}
  for block in blocks:
    if remat:
      x, res_var = hk.remat(lambda h, b=block: b(h, is_training))(x)
    else:
      x, res_var = block(x, is_training)
    if return_metrics:
      for k, val in signal_metrics(x).items():
        metrics[k].append(val)
      metrics['res_avg_var'].append(res_var)
  return x, ({k: jnp.stack(v) for k, v in metrics.items()} if return_metrics else None)


def run_stages(stages, x, is_training: bool, return_metrics: bool, remat: bool = False):
  """`run_blocks` over stages (lists of blocks): returns (output, metrics, [each stage's output]).

  Metrics run over all blocks in order, as from one `run_blocks` call.
  """
  stage_outputs, stage_metrics = [], []
  for blocks in stages:
    x, metrics = run_blocks(blocks, x, is_training, return_metrics, remat)
    stage_outputs.append(x)
    stage_metrics.append(metrics)
  if not return_metrics:
    return x, None, stage_outputs
  return x, {k: jnp.concatenate([m[k] for m in stage_metrics]) for k in stage_metrics[0]}, stage_outputs


def stage_features(stem: jax.Array, stage_outputs: Sequence[jax.Array], pre_logits: jax.Array) -> dict:
  """The `return_features` dict: 'stem', 'stage_1'.. (each stage's last block output), 'pre_logits'."""
  features = {'stem': stem}
  features.update({f'stage_{i}': out for i, out in enumerate(stage_outputs, start=1)})
  features['pre_logits'] = pre_logits
  return features


def model_outputs(logits, metrics, features, return_metrics: bool, return_features: bool):
  """logits; (logits, metrics); (logits, features); or (logits, metrics, features), as asked."""
  out = (logits,) + ((metrics,) if return_metrics else ()) + ((features,) if return_features else ())
  return out if len(out) > 1 else logits
