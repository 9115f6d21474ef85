"""Pre-activation NF-ResNets (Brock et al. 2021a), the models of the paper's AGC study.

Module tree as the reference `NF_ResNet`: `NF_ResNet/~/initial_conv`,
`NF_ResNet/~/nf_res_block[_k]/~/conv0..2`, `conv_shortcut`, and `NF_ResNet/~/linear`.
"""
from typing import Optional, Sequence

import haiku as hk

from nfnets import layers

DEPTHS = {
    'ResNet26': (2, 2, 2, 2),  # not in the reference: a small model for CPU-scale studies
    'ResNet50': (3, 4, 6, 3),
    'ResNet101': (3, 4, 23, 3),
    'ResNet152': (3, 8, 36, 3),
    'ResNet200': (3, 24, 36, 3),
}
STRIDES = layers.STAGE_STRIDES
STAGE_WIDTHS = (64, 128, 256, 512)  # multiplied by `width`


def nf_resnet_plan(num_classes: int = 1000, variant: str = 'ResNet50', width: float = 4,
                   alpha: float = 0.2, stochdepth_rate: float = 0.1, use_se: bool = False,
                   se_ratio: float = 0.25, depths: Optional[Sequence[int]] = None) -> layers.NetPlan:
  """The plan `NFResNet` is built from (arguments as `NFResNet`'s).

  The reference `NF_ResNet` (deepmind-research nfnets/nf_resnet.py): a 7x7/2 stem conv of 16 * width
  channels and a 3x3/2 max pool; stages of 64, 128, 256, 512 x width channels; bottleneck blocks of
  width out / 4 with one ungrouped 3x3 conv; the beta/alpha recurrence of `layers.plan_blocks`.
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
  if variant not in DEPTHS:
    raise ValueError(f'Unknown NF-ResNet variant {variant!r}; accepted: {sorted(DEPTHS)}')
  if not isinstance(width, (int, float)) or isinstance(width, bool) or width * 16 < 1:
    raise ValueError(f'width must be a number >= 1/16 (4 = ResNet-50), got {width!r}')
  stem = layers.ConvSpec('initial_conv', int(16 * width), 7, 2)
  blocks = layers.plan_blocks(
      depths or DEPTHS[variant], [int(w * width) for w in STAGE_WIDTHS], stem.out_ch,
      bottleneck=lambda out_ch: (int(out_ch * 0.25), 1), alpha=alpha, stochdepth_rate=stochdepth_rate,
      num_3x3=1, se_hidden=lambda out_ch: max(1, int(out_ch * se_ratio)) if use_se else 0, strides=STRIDES)
  return layers.NetPlan(stem=(stem,), stem_pool_stride=2, blocks=blocks, final_conv_ch=None,
                        num_classes=num_classes)


class NFResBlock(hk.Module):
  """Pre-activation bottleneck (ratio 0.25) with an optional SE, stochastic depth and a skip gain."""

  def __init__(self, spec: layers.BlockSpec, act, conv_impl: str = 'auto', skip_gain_init: float = 0.0,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.spec, self.act, self.skip_gain_init = spec, act, skip_gain_init
    s = spec
    self.conv0 = layers.WSConv2D(s.width, 1, conv_impl=conv_impl, name='conv0')
    self.conv1 = layers.WSConv2D(s.width, 3, stride=s.stride, conv_impl=conv_impl, name='conv1')
    self.conv2 = layers.WSConv2D(s.out_ch, 1, conv_impl=conv_impl, name='conv2')
    if s.use_projection:
      self.conv_shortcut = layers.WSConv2D(s.out_ch, 1, stride=s.stride, conv_impl=conv_impl,
                                           name='conv_shortcut')
    self.se = layers.SqueezeExcite(s.out_ch, s.out_ch, hidden_ch=s.se_hidden) if s.se_hidden else None
    self.stoch_depth = layers.StochDepth(s.stochdepth_rate)

  def __call__(self, x, is_training):
    s = self.spec
    out = self.act(x) * s.beta
    shortcut = self.conv_shortcut(out) if s.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv2(self.act(out))
    if self.se is not None:
      out = (self.se(out) * 2) * out
    return layers.residual_join(out, shortcut, s.alpha, self.stoch_depth, is_training, self.skip_gain_init)


class NFResNet(hk.Module):
  """Normalizer-free pre-activation ResNet-26/50/101/152/200.

  Called as `model(images_nhwc, is_training, return_metrics=False, return_features=False)`, with the
  returns of `NFNet`: logits, then `metrics` and `features` when asked. Features: `stem` (the 7x7 conv
  and 3x3 max pool, [B, H/4, W/4, 16 * width]), `stage_1`..`stage_4` (each stage's last block output),
  `pre_logits` (activation then global mean pool, before dropout: the classifier's input).
  `conv_impl` lowers every conv as in `NFNet` (see `nfnets.conv`: 'auto' picks per backend and shape).
  `width` multiplies 16 (stem) and 64/128/256/512 (stages): 4 is ResNet-50's width. `depths` overrides
  the variant's blocks per stage. `skip_gain_init` is every block's initial skip gain (0: SkipInit).
  """

  def __init__(self, num_classes: int, variant: str = 'ResNet50', width: float = 4, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float = 0.0, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25, fc_init=None,
               depths: Optional[Sequence[int]] = None, conv_impl: str = 'auto', remat: bool = False,
               skip_gain_init: float = 0.0, name: str = 'NF_ResNet'):
    super().__init__(name=name)
    self.plan = nf_resnet_plan(num_classes, variant, width=width, alpha=alpha,
                               stochdepth_rate=stochdepth_rate, use_se=use_se, se_ratio=se_ratio,
                               depths=depths)
    self.remat, self.drop_rate = remat, drop_rate
    self.act = layers.activation(activation)
    (stem,) = self.plan.stem
    self.initial_conv = layers.WSConv2D(stem.out_ch, stem.kernel, stride=stem.stride, conv_impl=conv_impl,
                                        name=stem.name)
    self.stages = [[NFResBlock(spec, self.act, conv_impl, skip_gain_init) for spec in stage]
                   for stage in self.plan.stages]
    self.blocks = [block for stage in self.stages for block in stage]
    self.fc = hk.Linear(num_classes, w_init=fc_init or hk.initializers.RandomNormal(0.01, 0))

  def __call__(self, x, is_training: bool, return_metrics: bool = False, return_features: bool = False):
    layers.check_images(x)
    out = self.initial_conv(x)
    stem = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    out, metrics, stage_outputs = layers.run_stages(self.stages, stem, is_training, return_metrics,
                                                    self.remat)
    pool = layers.global_pool(self.act(out))
    logits = self.fc(layers.dropout(pool, self.drop_rate, is_training))
    features = layers.stage_features(stem, stage_outputs, pool) if return_features else None
    return layers.model_outputs(logits, metrics, features, return_metrics, return_features)
