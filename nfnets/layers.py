"""Normalizer-free building blocks: scaled WS conv, squeeze-excite, stochastic depth, gamma activations,
and the network plan (`NetPlan`, `plan_blocks`) that NFNets and NF-ResNets are built from.

Parameter names match DeepMind's released Haiku checkpoints (`w`, `gain`, `bias`; SE `linear`/`linear_1`).
"""
import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple, Union

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
  # As a [fan_in, out] matrix: XLA:CPU reduces over, and broadcasts along, the leading axes of a 4-D kernel
  # (and differentiates that) up to 10x slower than over the rows of the same matrix (1x1 kernels worst).
  fan_in = math.prod(w.shape[:-1])
  w2 = w.reshape(fan_in, w.shape[-1])
  mean = jnp.mean(w2, axis=0)
  var = jnp.var(w2, axis=0)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  # Same arithmetic order as the reference (w*scale - mean*scale), for bit-level parity.
  return (w2 * scale - mean * scale).reshape(w.shape)


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


# ------------------------------------------------------------------------------------------ the plan
STAGE_STRIDES = (1, 2, 2, 2)  # both families (reference `stride_pattern`)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One residual block: shapes, its beta/alpha signal-propagation scalars and its drop rate."""
  index: int  # over the whole network
  stage: int  # 0-based
  stage_index: int  # position in its stage; 0 is the transition block
  in_ch: int
  out_ch: int
  width: int  # bottleneck width of the 3x3 convs
  groups: int  # of the 3x3 convs
  stride: int
  num_3x3: int  # 3x3 convs in the bottleneck: 2 in NFNets (conv1, conv1b), 1 in NF-ResNets
  se_hidden: int  # squeeze-excite hidden units; 0: no squeeze-excite
  alpha: float
  beta: float  # 1 / expected_std: the residual branch's input scale
  expected_std: float  # expected std of the block's input
  expected_out_var: float  # expected variance of its output (unit-variance branch, skip gain 1)
  stochdepth_rate: float

  @property
  def use_projection(self) -> bool:
    return self.stride > 1 or self.in_ch != self.out_ch


def plan_blocks(depths: Sequence[int], stage_channels: Sequence[int], in_ch: int,
                bottleneck: Callable[[int], Tuple[int, int]], alpha: float, stochdepth_rate: float,
                num_3x3: int, se_hidden: Callable[[int], int],
                strides: Sequence[int] = STAGE_STRIDES) -> Tuple[BlockSpec, ...]:
  """Every block of a network: the one home of the beta/alpha recurrence, for both families.

  Brock et al. 2021, Section 3: block i computes h + alpha * f(h / beta_i) with beta_i the expected std
  of its input, so Var grows by alpha^2 per block, and a transition block (the first of a stage, whose
  shortcut also reads h / beta_i) resets it to 1 + alpha^2. The loop is the reference's
  (deepmind-research nfnets/nfnet.py and nf_resnet.py), stochastic depth included: block i of N drops
  with stochdepth_rate * i / N.

  Args:
    stage_channels: each stage's output channels (already width-scaled).
    bottleneck: the family's rule, out_ch -> (bottleneck width, groups of the 3x3 convs).
    se_hidden: the family's rule, out_ch -> squeeze-excite hidden units (0: none).
  """
  depths = tuple(depths)
  if len(depths) != len(strides) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths):
    raise ValueError(f'depths must be {len(strides)} integers >= 1 (blocks per stage), got {depths!r}')
  if len(stage_channels) != len(strides):
    raise ValueError(f'widths must be {len(strides)} stage widths, got {tuple(stage_channels)!r}')
  num_blocks, specs, expected_std = sum(depths), [], 1.0
  for stage, (out_ch, depth, stride) in enumerate(zip(stage_channels, depths, strides)):
    width, groups = bottleneck(out_ch)
    for stage_index in range(depth):
      # The first block of a stage: its output variance is reset (1 + alpha^2), later ones add alpha^2.
      out_var = (1.0 if stage_index == 0 else expected_std ** 2) + alpha ** 2
      index = len(specs)
      specs.append(BlockSpec(
          index=index, stage=stage, stage_index=stage_index, in_ch=in_ch, out_ch=out_ch, width=width,
          groups=groups, stride=stride if stage_index == 0 else 1, num_3x3=num_3x3,
          se_hidden=se_hidden(out_ch), alpha=alpha, beta=1.0 / expected_std, expected_std=expected_std,
          expected_out_var=out_var, stochdepth_rate=stochdepth_rate * index / num_blocks))
      in_ch, expected_std = out_ch, math.sqrt(out_var)
  return tuple(specs)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  name: str
  out_ch: int
  kernel: int
  stride: int


@dataclasses.dataclass(frozen=True)
class NetPlan:
  """Everything that shapes a network: the model builds its modules from it, FLOP counts read it."""
  stem: Tuple[ConvSpec, ...]  # WS convs in order, an activation between consecutive ones
  stem_pool_stride: int  # stride of a 3x3 max pool after the stem convs; 1: no pool
  blocks: Tuple[BlockSpec, ...]
  final_conv_ch: Optional[int]  # the 1x1 conv before pooling; None: none (NF-ResNets)
  num_classes: int

  @property
  def stages(self) -> Tuple[Tuple[BlockSpec, ...], ...]:
    return tuple(tuple(b for b in self.blocks if b.stage == s) for s in range(self.blocks[-1].stage + 1))

  @property
  def num_features(self) -> int:
    """Width of `pre_logits`, the pooled vector the classifier reads."""
    return self.final_conv_ch or self.blocks[-1].out_ch

  def macs(self, resolution: int) -> int:
    """Multiply-accumulates of one forward pass on a square image: convs, SE FCs and the classifier.

    'SAME' padding: a stride-s layer maps h to ceil(h / s). Biases, activations and pooling are not
    counted, as in the reference's `count_flops`.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
      raise ValueError(f'resolution must be an integer >= 1 (pixels), got {resolution!r}')
    conv = lambda h, k, cin, cout, groups=1: h * h * k * k * (cin // groups) * cout
    h, cin, total = resolution, 3, 0
    for c in self.stem:
      h = -(-h // c.stride)
      total += conv(h, c.kernel, cin, c.out_ch)
      cin = c.out_ch
    h = -(-h // self.stem_pool_stride)
    for b in self.blocks:
      h_out = -(-h // b.stride)
      total += conv(h, 1, b.in_ch, b.width)  # conv0 at the input resolution
      total += b.num_3x3 * conv(h_out, 3, b.width, b.width, b.groups)  # the first one strides
      total += conv(h_out, 1, b.width, b.out_ch)
      if b.use_projection:
        total += conv(h_out, 1, b.in_ch, b.out_ch)
      total += 2 * b.out_ch * b.se_hidden
      h = h_out
    if self.final_conv_ch:
      total += conv(h, 1, self.blocks[-1].out_ch, self.final_conv_ch)
    return total + self.num_features * self.num_classes
