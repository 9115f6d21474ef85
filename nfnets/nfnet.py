"""NFNet-F0..F7 and F0+..F7+ (Brock et al. 2021), with the reference's module tree and numbers.

The variant table is the one source of truth for depths, image sizes, drop rates and RandAugment levels;
`nfnet_plan` derives every layer's shape from it (blocks through `block_plan`, the shared beta/alpha
recurrence `layers.plan_blocks` with NFNet's shape rules); the model is built from that plan and
`registry.count_flops` reads it.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import haiku as hk

from nfnets import layers


@dataclasses.dataclass(frozen=True)
class Variant:
  depths: Sequence[int]
  train_size: int
  test_size: int
  drop_rate: float
  ra_magnitude: int  # RandAugment magnitude; the reference always uses 4 layers for NFNets.
  widths: Sequence[int] = (256, 512, 1536, 1536)


_BASE = {
    'F0': Variant((1, 2, 6, 3), 192, 256, 0.2, 5),
    'F1': Variant((2, 4, 12, 6), 224, 320, 0.3, 10),
    'F2': Variant((3, 6, 18, 9), 256, 352, 0.4, 10),
    'F3': Variant((4, 8, 24, 12), 320, 416, 0.4, 15),
    'F4': Variant((5, 10, 30, 15), 384, 512, 0.5, 15),
    'F5': Variant((6, 12, 36, 18), 416, 544, 0.5, 15),
    'F6': Variant((7, 14, 42, 21), 448, 576, 0.5, 15),
    'F7': Variant((8, 16, 48, 24), 480, 608, 0.5, 15),
}
# "+" variants copy every field and widen the stages.
VARIANTS = dict(_BASE)
VARIANTS.update({k + '+': dataclasses.replace(v, widths=(384, 768, 2048, 2048)) for k, v in _BASE.items()})

RA_LAYERS = 4
STRIDES = layers.STAGE_STRIDES
STEM_WIDTHS = (16, 32, 64)  # the fourth stem conv has widths[0] // 2 channels.


def get_variant(variant: str) -> Variant:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown NFNet variant {variant!r}; accepted: {sorted(VARIANTS)}')
  return VARIANTS[variant]


def block_plan(depths: Sequence[int], widths: Sequence[int], in_ch: int, width_mult: float = 1.0,
               expansion: float = 0.5, group_width: int = 128, alpha: float = 0.2,
               stochdepth_rate: float = 0.25, strides: Sequence[int] = STRIDES, se_ratio: float = 0.5,
               use_two_convs: bool = True) -> Tuple[layers.BlockSpec, ...]:
  """NFNet blocks: `layers.plan_blocks` (the beta/alpha recurrence) with NFNet's shape rules.

  A stage of width w has int(w * width_mult) output channels and a grouped bottleneck of
  int(out * expansion) rounded down to a multiple of `group_width` (reference `NFBlock`, big_width).
  """
  def bottleneck(out_ch):
    groups = int(out_ch * expansion) // group_width
    if groups < 1:
      raise ValueError(f'Stage width {out_ch} * expansion {expansion} is below the group width '
                       f'{group_width}; accepted: group_width <= {int(out_ch * expansion)}')
    return groups * group_width, groups

  return layers.plan_blocks(
      depths, [int(w * width_mult) for w in widths], in_ch, bottleneck, alpha, stochdepth_rate,
      num_3x3=2 if use_two_convs else 1, se_hidden=lambda out_ch: max(1, int(out_ch * se_ratio)),
      strides=strides)


def stem_channels(widths: Sequence[int]) -> int:
  """The last stem conv's channels: half the first stage's *unscaled* width.

  The reference (deepmind-research nfnets/nfnet.py, `ch = self.width_pattern[0] // 2`) does not apply
  `width` here, nor to the 16/32/64 stem convs: only the stages' widths are multiplied.
  """
  return widths[0] // 2


def final_conv_channels(last_ch: int, final_conv_mult: Optional[float],
                        final_conv_ch: Optional[int]) -> int:
  """The final 1x1 conv's channels, with the reference's precedence (deepmind-research nfnets/nfnet.py).

  `final_conv_mult` wins: int(final_conv_mult * last_ch). `final_conv_ch` is read only when
  `final_conv_mult` is None, so passing it alongside the default multiplier (2) leaves it unused.
  """
  if final_conv_mult is None:
    if final_conv_ch is None:
      raise ValueError('final_conv_mult and final_conv_ch are both None; accepted: a multiplier > 0, or '
                       'final_conv_mult=None with final_conv_ch an integer >= 1')
    if not isinstance(final_conv_ch, int) or isinstance(final_conv_ch, bool) or final_conv_ch < 1:
      raise ValueError(f'final_conv_ch must be an integer >= 1, got {final_conv_ch!r}')
    return final_conv_ch
  if (not isinstance(final_conv_mult, (int, float)) or isinstance(final_conv_mult, bool)
      or final_conv_mult <= 0):
    raise ValueError(f'final_conv_mult must be a number > 0 or None, got {final_conv_mult!r}')
  return int(final_conv_mult * last_ch)


def nfnet_plan(num_classes: int = 1000, variant: str = 'F0', width: float = 1.0, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.25, final_conv_mult: Optional[float] = 2.0,
               final_conv_ch: Optional[int] = None, use_two_convs: bool = True,
               depths: Optional[Sequence[int]] = None, widths: Optional[Sequence[int]] = None,
               group_width: int = 128, stem_widths: Sequence[int] = STEM_WIDTHS) -> layers.NetPlan:
  """The plan `NFNet` is built from (arguments as `NFNet`'s): stem, blocks, final conv, classifier."""
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
  v = get_variant(variant)
  widths = tuple(widths or v.widths)
  stem = [layers.ConvSpec(f'stem_conv{i}', ch, 3, 2 if i == 0 else 1) for i, ch in enumerate(stem_widths)]
  stem.append(layers.ConvSpec(f'stem_conv{len(stem)}', stem_channels(widths), 3, 2))
  blocks = block_plan(depths or v.depths, widths, stem[-1].out_ch, width_mult=width,
                      group_width=group_width, alpha=alpha, stochdepth_rate=stochdepth_rate,
                      se_ratio=se_ratio, use_two_convs=use_two_convs)
  final_ch = final_conv_channels(blocks[-1].out_ch, final_conv_mult, final_conv_ch)
  return layers.NetPlan(stem=tuple(stem), stem_pool_stride=1, blocks=blocks, final_conv_ch=final_ch,
                        num_classes=num_classes)


class NFBlock(hk.Module):
  """NFNet bottleneck block: grouped 3x3 conv(s) (`spec.num_3x3`), SE, stochastic depth, a skip gain."""

  def __init__(self, spec: layers.BlockSpec, act, conv_impl: str = 'auto', skip_gain_init: float = 0.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.spec, self.act, self.skip_gain_init = spec, act, skip_gain_init
    s = spec
    self.conv0 = layers.WSConv2D(s.width, 1, conv_impl=conv_impl, name='conv0')
    self.conv1 = layers.WSConv2D(s.width, 3, stride=s.stride, feature_group_count=s.groups,
                                 conv_impl=conv_impl, name='conv1')
    if s.num_3x3 == 2:
      self.conv1b = layers.WSConv2D(s.width, 3, feature_group_count=s.groups, conv_impl=conv_impl,
                                    name='conv1b')
    self.conv2 = layers.WSConv2D(s.out_ch, 1, conv_impl=conv_impl, name='conv2')
    if s.use_projection:
      self.conv_shortcut = layers.WSConv2D(s.out_ch, 1, conv_impl=conv_impl, name='conv_shortcut')
    self.se = layers.SqueezeExcite(s.out_ch, s.out_ch, hidden_ch=s.se_hidden)
    self.stoch_depth = layers.StochDepth(s.stochdepth_rate)

  def __call__(self, x, is_training):
    s = self.spec
    out = self.act(x) * s.beta
    if s.stride > 1:
      shortcut = self.conv_shortcut(hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME'))
    elif s.use_projection:
      shortcut = self.conv_shortcut(out)
    else:
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    if s.num_3x3 == 2:
      out = self.conv1b(self.act(out))
    out = self.conv2(self.act(out))
    out = (self.se(out) * 2) * out
    return layers.residual_join(out, shortcut, s.alpha, self.stoch_depth, is_training, self.skip_gain_init)


class NFNet(hk.Module):
  """Normalizer-Free Network F0..F7 / F0+..F7+.

  Called as `model(images_nhwc, is_training, return_metrics=False, return_features=False)`; returns
  logits, with `metrics` and then `features` appended as a tuple when asked: `(logits, metrics)`,
  `(logits, features)` or `(logits, metrics, features)`.
    metrics: per-block signal-propagation statistics of each block's output: `avg_sq_mean`, `avg_var`
      and the residual-branch variance `res_avg_var` (arrays of length num_blocks).
    features: `stem` (the last stem conv's output, [B, H/4, W/4, C]), `stage_1`..`stage_4` (each
      stage's last block output), `pre_logits` (the [B, C] vector the classifier reads: final conv,
      activation, global mean pool, before dropout; the reference's `outputs['pool']`).
  Asking for features adds no parameters: the parameter tree is the same either way.

  Args:
    stochdepth_rate: the rate of the last block (0.25 in the paper and the reference config).
    drop_rate: dropout before the classifier; None takes the variant's rate.
    conv_impl: grouped-conv lowering, see `nfnets.conv` ('auto' picks per backend).
    remat: recompute each block's activations in the backward pass (jax.checkpoint) to save memory.
    width: multiplies the four stage widths only; the stem (16, 32, 64, then widths[0] // 2
      channels) is not scaled, as in the reference.
    final_conv_mult, final_conv_ch: the final conv has int(final_conv_mult * last stage width)
      channels; final_conv_ch is used only when final_conv_mult is None (the reference's rule).
    depths, widths, group_width, stem_widths: shape overrides for small research models; the
      defaults give the paper's variants.
    skip_gain_init: the initial value of every block's `skip_gain` (0 in the paper: SkipInit).
  """

  def __init__(self, num_classes: int, variant: str = 'F0', width: float = 1.0, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.25, drop_rate: Optional[float] = None,
               activation: str = 'gelu', fc_init=None, final_conv_mult: Optional[float] = 2.0,
               final_conv_ch: Optional[int] = None, use_two_convs: bool = True, conv_impl: str = 'auto',
               depths: Optional[Sequence[int]] = None, widths: Optional[Sequence[int]] = None,
               group_width: int = 128, stem_widths: Sequence[int] = STEM_WIDTHS,
               remat: bool = False, skip_gain_init: float = 0.0, name: str = 'NFNet'):
    super().__init__(name=name)
    self.plan = nfnet_plan(
        num_classes, variant, width=width, se_ratio=se_ratio, alpha=alpha, stochdepth_rate=stochdepth_rate,
        final_conv_mult=final_conv_mult, final_conv_ch=final_conv_ch, use_two_convs=use_two_convs,
        depths=depths, widths=widths, group_width=group_width, stem_widths=stem_widths)
    self.variant, self.num_classes, self.remat = variant, num_classes, remat
    self.drop_rate = get_variant(variant).drop_rate if drop_rate is None else drop_rate
    self.act = layers.activation(activation)
    # Modules are created in the reference's order, so Haiku names them as in the released weights.
    self.stem_convs = [layers.WSConv2D(c.out_ch, c.kernel, stride=c.stride, conv_impl=conv_impl,
                                       name=c.name) for c in self.plan.stem]
    self.stages = [[NFBlock(spec, self.act, conv_impl, skip_gain_init) for spec in stage]
                   for stage in self.plan.stages]
    self.blocks = [block for stage in self.stages for block in stage]
    self.final_conv = layers.WSConv2D(self.plan.final_conv_ch, 1, conv_impl=conv_impl, name='final_conv')
    self.fc = hk.Linear(num_classes, w_init=fc_init or hk.initializers.RandomNormal(0.01, 0))

  def __call__(self, x, is_training: bool, return_metrics: bool = False, return_features: bool = False):
    layers.check_images(x)
    out = x
    for i, conv in enumerate(self.stem_convs):
      out = conv(out)
      if i < len(self.stem_convs) - 1:  # no activation after the last stem conv
        out = self.act(out)
    stem = out
    out, metrics, stage_outputs = layers.run_stages(self.stages, out, is_training, return_metrics,
                                                    self.remat)
    pool = layers.global_pool(self.act(self.final_conv(out)))
    logits = self.fc(layers.dropout(pool, self.drop_rate, is_training))
    features = layers.stage_features(stem, stage_outputs, pool) if return_features else None
    return layers.model_outputs(logits, metrics, features, return_metrics, return_features)
