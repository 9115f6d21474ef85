"""One registry: model name -> constructor, train/test image size, dropout rate, RandAugment policy; and the
one mapping from a config's `model` block to the model it describes (`model_from_config`).

Every other module (configs, data pipeline, benchmark, checkpoint import) reads these facts from here, and
every tool that builds the model of a config or a run (the experiment, predict, export, the linear probe, the
benchmark's FLOP count, the signal-propagation plots) builds it with `model_from_config`.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional

import haiku as hk

from nfnets import layers, nf_resnet, nfnet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  constructor: Callable[..., Any]  # called as constructor(num_classes=..., **kwargs)
  kwargs: Dict[str, Any]
  train_size: int
  test_size: int
  drop_rate: float
  ra_layers: int  # RandAugment layers; 0 disables RandAugment
  ra_magnitude: int


def _build() -> Dict[str, ModelSpec]:
  specs = {}
  for name, v in nfnet.VARIANTS.items():
    specs[name] = ModelSpec(name, nfnet.NFNet, {'variant': name}, v.train_size, v.test_size, v.drop_rate,
                            nfnet.RA_LAYERS, v.ra_magnitude)
  # NF-ResNets of the AGC study: 224 px, standard ResNet augmentation (crop + flip), no dropout.
  for variant in nf_resnet.DEPTHS:
    name = 'nf_' + variant.lower()
    specs[name] = ModelSpec(name, nf_resnet.NFResNet, {'variant': variant}, 224, 224, 0.0, 0, 0)
  # A small NFNet with the F0 block design, for CPU demos and tests (not a paper model).
  specs['nfnet_tiny'] = ModelSpec(
      'nfnet_tiny', nfnet.NFNet,
      {'variant': 'F0', 'depths': (1, 1, 1, 1), 'widths': (32, 64, 128, 128), 'group_width': 16,
       'stem_widths': (8, 16, 16)},
      32, 32, 0.0, 0, 0)
  return specs


MODELS: Dict[str, ModelSpec] = _build()


def get_spec(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; accepted: {sorted(MODELS)}')
  return MODELS[name]


def create_model(name: str, num_classes: int = 1000, **overrides):
  """Builds the Haiku module for a registry name; must be called inside `hk.transform`.

  `overrides` replace constructor arguments (e.g. drop_rate, stochdepth_rate, conv_impl).
  """
  spec = get_spec(name)
  kwargs = dict(spec.kwargs)
  kwargs.setdefault('drop_rate', spec.drop_rate)
  kwargs.update(overrides)
  return spec.constructor(num_classes=num_classes, **kwargs)


# The fields of a config's `model` block (configs/base.py) that are constructor arguments; None (or absent)
# keeps the registry variant's own value.
MODEL_CONFIG_FIELDS = ('drop_rate', 'stochdepth_rate', 'width', 'depths', 'skip_gain_init', 'conv_impl')


def model_kwargs(model_config: Mapping[str, Any], remat: bool = False, conv_impl: Optional[str] = None):
  """(name, num_classes, constructor overrides) of a config's `model` block, as `model_from_config` builds it.

  Args:
    model_config: `config.model` (a ConfigDict), or any mapping with at least 'name'; absent or None
      fields keep the variant's own values, `num_classes` defaults to 1000.
    remat: the top-level `config.remat`.
    conv_impl: replaces `model.conv_impl` (tools.export lowers with XLA's convolution on every platform).
  """
  name = model_config['name']
  num_classes = model_config.get('num_classes')
  num_classes = 1000 if num_classes is None else num_classes
  kwargs = {k: model_config.get(k) for k in MODEL_CONFIG_FIELDS if model_config.get(k) is not None}
  if 'depths' in kwargs:
    kwargs['depths'] = tuple(kwargs['depths'])  # config.json stores a tuple as a list
  if conv_impl is not None:
    kwargs['conv_impl'] = conv_impl
  if remat:
    kwargs['remat'] = True
  return name, int(num_classes), kwargs


def model_from_config(model_config: Mapping[str, Any], remat: bool = False, conv_impl: Optional[str] = None,
                      **constructor_kwargs):
  """The Haiku module a config's `model` block describes (name, num_classes, width, depths, drop_rate,
  stochdepth_rate, skip_gain_init, conv_impl); must be called inside `hk.transform`.

  `remat` is the top-level `config.remat`; `conv_impl` replaces the config's; `constructor_kwargs` are
  constructor arguments that no config field holds (research shapes such as `widths`, `group_width`).
  """
  name, num_classes, kwargs = model_kwargs(model_config, remat, conv_impl)
  return create_model(name, num_classes, **kwargs, **constructor_kwargs)


def plan_from_config(model_config: Mapping[str, Any], **constructor_kwargs) -> layers.NetPlan:
  """The `layers.NetPlan` of `model_from_config(model_config, **constructor_kwargs)` (FLOPs: `.macs(size)`)."""
  name, num_classes, kwargs = model_kwargs(model_config)
  return model_plan(name, num_classes, **kwargs, **constructor_kwargs)


def model_plan(name: str, num_classes: int = 1000, **overrides) -> layers.NetPlan:
  """The `layers.NetPlan` that `create_model(name, num_classes, **overrides)` is built from.

  The model is constructed (no parameters are created) and its own plan returned, so this is the plan
  of that exact model: stem convs, every block (shapes, beta, expected input std and output variance,
  stochastic-depth rate), final conv and classifier.
  """
  plans = []
  hk.transform(lambda: plans.append(create_model(name, num_classes, **overrides).plan)).init(None)
  return plans[0]


def count_flops(name: str, resolution: int, num_classes: int = 1000, **overrides) -> int:
  """Forward multiply-accumulates of a registered model at `resolution` (see `layers.NetPlan.macs`).

  The paper's "FLOPs" are this count at the test resolution (F0 at 256 px: 12,384,198,656).
  `overrides` are constructor arguments, as for `create_model` (e.g. width, depths).
  """
  return model_plan(name, num_classes, **overrides).macs(resolution)
