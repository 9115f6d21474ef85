"""Pre-activation NF-ResNets (Brock et al. 2021a), the models of the paper's AGC study.

Module tree as the reference `NF_ResNet`: `NF_ResNet/~/initial_conv`, `NF_ResNet/~/nf_res_block[_k]/~/conv0..2`,
`conv_shortcut`, and `NF_ResNet/~/linear`.
"""
import math
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
STRIDES = (1, 2, 2, 2)


class NFResBlock(hk.Module):
  """Pre-activation bottleneck (ratio 0.25) with an optional SE, stochastic depth and a skip gain."""

  def __init__(self, in_ch, out_ch, stride, beta, alpha, act, stochdepth_rate, use_se, se_ratio,
               skip_gain_init: float = 0.0, name: Optional[str] = None):
    super().__init__(name=name)
    self.skip_gain_init = skip_gain_init
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha, self.act = beta, alpha, act
    width = int(out_ch * 0.25)
    self.conv0 = layers.WSConv2D(width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(width, 3, stride=stride, name='conv1')
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = layers.WSConv2D(out_ch, 1, stride=stride, name='conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio) if use_se else None
    self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(self, x, is_training):
    out = self.act(x) * self.beta
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.act(out))
    out = self.conv2(self.act(out))
    if self.se is not None:
      out = (self.se(out) * 2) * out
    return layers.residual_join(out, shortcut, self.alpha, self.stoch_depth, is_training,
                                self.skip_gain_init)


class NFResNet(hk.Module):
  """Normalizer-free pre-activation ResNet-26/50/101/152/200.

  Called as `model(images_nhwc, is_training, return_metrics=False, return_features=False)`, with the
  returns of `NFNet`: logits, then `metrics` and `features` when asked. Features: `stem` (the 7x7 conv
  and 3x3 max pool, [B, H/4, W/4, 16 * width]), `stage_1`..`stage_4` (each stage's last block output),
  `pre_logits` (activation then global mean pool, before dropout: the classifier's input).
  `conv_impl` is accepted for a uniform interface with NFNet; NF-ResNets have no grouped convs.
  `width` multiplies 16 (stem) and 64/128/256/512 (stages): 4 is ResNet-50's width. `depths` overrides
  the variant's blocks per stage. `skip_gain_init` is every block's initial skip gain (0: SkipInit).
  """

  def __init__(self, num_classes: int, variant: str = 'ResNet50', width: float = 4, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float = 0.0, activation: str = 'relu',
               use_se: bool = False, se_ratio: float = 0.25, fc_init=None,
               depths: Optional[Sequence[int]] = None, conv_impl: str = 'auto', remat: bool = False,
               skip_gain_init: float = 0.0, name: str = 'NF_ResNet'):
    super().__init__(name=name)
    self.remat = remat
    del conv_impl
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f'num_classes must be an integer >= 1, got {num_classes!r}')
    if variant not in DEPTHS:
      raise ValueError(f'Unknown NF-ResNet variant {variant!r}; accepted: {sorted(DEPTHS)}')
    self.drop_rate = drop_rate
    self.act = layers.activation(activation)
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width * 16 < 1:
      raise ValueError(f'width must be a number >= 1/16 (4 = ResNet-50), got {width!r}')
    depths = tuple(depths or DEPTHS[variant])
    if len(depths) != len(STRIDES) or not all(isinstance(d, int) and d >= 1 for d in depths):
      raise ValueError(f'depths must be {len(STRIDES)} integers >= 1 (blocks per stage), got {depths!r}')
    ch = int(16 * width)
    self.initial_conv = layers.WSConv2D(ch, 7, stride=2, name='initial_conv')
    self.stages = []
    expected_std, index, num_blocks = 1.0, 0, sum(depths)
    for stage_width, depth, stride in zip((64, 128, 256, 512), depths, STRIDES):
      self.stages.append([])
      for block_index in range(depth):
        out_ch = int(stage_width * width)
        self.stages[-1].append(NFResBlock(
            ch, out_ch, stride if block_index == 0 else 1, beta=1.0 / expected_std, alpha=alpha,
            act=self.act, stochdepth_rate=stochdepth_rate * index / num_blocks, use_se=use_se,
            se_ratio=se_ratio, skip_gain_init=skip_gain_init))
        ch, index = out_ch, index + 1
        if block_index == 0:
          expected_std = 1.0
        expected_std = math.sqrt(expected_std ** 2 + alpha ** 2)
    self.blocks = [b for stage in self.stages for b in stage]
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
