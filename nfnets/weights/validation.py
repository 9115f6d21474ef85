"""Checks a weight tree against a registry model: expected shapes, variant detection, every mismatch at once.

The expected `{module: {name: shape}}` comes from `jax.eval_shape` of the registry model's init, so no
arrays are made. F0 .. F6 differ in their block counts (paper, Table 1), an F and its F+ in widths; that is
how `detect_model` tells the variants apart.
"""
import functools
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import nfnet
from nfnets import registry
from nfnets.weights.tree import WeightsError, block_modules

# The argument `num_classes` of the checks below shadows the function `num_classes`; they call `_head_width`.
# pylint: disable=redefined-outer-name

Shapes = Dict[str, Dict[str, Tuple[int, ...]]]


def _head_width(params: Mapping[str, Any], default: int) -> int:
  for module, ps in params.items():
    parts = module.split('/~/')
    if len(parts) == 2 and parts[1] == 'linear' and 'w' in ps and len(np.shape(ps['w'])) == 2:
      return int(np.shape(ps['w'])[1])
  return default


def num_classes(params: Mapping[str, Any], default: int = 1000) -> int:
  """Width of the classifier, a top-level `<root>/~/linear`; `default` if there is none."""
  return _head_width(params, default)


def count_params(params: Mapping[str, Mapping[str, Any]]) -> int:
  """Number of scalars in a tree (F0: 71,489,284)."""
  return int(sum(np.size(x) for ps in params.values() for x in ps.values()))


def registry_name(name: str) -> str:
  """Registry name for a registry or timm model name: 'dm_nfnet_f3.dm_in1k' -> 'F3'."""
  m = re.fullmatch(r'dm_nfnet_f(\d)(?:\.\w+)?', name)
  if m:
    name = f'F{m.group(1)}'
  registry.get_spec(name)  # raises with the accepted names
  return name


def _model_blocks(name: str) -> Optional[int]:
  """Number of NFNet blocks of a registry model; None for models that are not NFNets."""
  spec = registry.get_spec(name)
  if spec.constructor is not nfnet.NFNet:
    return None
  depths = spec.kwargs.get('depths') or nfnet.get_variant(spec.kwargs['variant']).depths
  return int(sum(depths))


def _nfnet_names() -> List[str]:
  return [n for n in registry.MODELS if _model_blocks(n) is not None]


def expected_shapes(model_name: str, num_classes: int = 1000) -> Shapes:
  """`{module: {name: shape}}` of a registry model, from `jax.eval_shape` of its init (no arrays made)."""
  return {m: dict(ps) for m, ps in _expected_shapes(model_name, num_classes).items()}


@functools.lru_cache(maxsize=16)
def _expected_shapes(model_name: str, classes: int) -> Shapes:
  spec = registry.get_spec(model_name)
  f = hk.transform(lambda x: registry.create_model(model_name, classes)(x, is_training=False))
  images = jax.ShapeDtypeStruct((1, spec.train_size, spec.train_size, 3), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), images)
  return {m: {n: tuple(v.shape) for n, v in ps.items()} for m, ps in shapes.items()}


def config_shapes(model_config: Mapping[str, Any]) -> Shapes:
  """`{module: {name: shape}}` of the model a config's `model` block describes (`registry.model_from_config`:
  its width, depths, ... honoured), from `jax.eval_shape` of its init."""
  name, classes, kwargs = registry.model_kwargs(model_config)
  return {m: dict(ps) for m, ps in _config_shapes(name, classes, tuple(sorted(kwargs.items()))).items()}


@functools.lru_cache(maxsize=16)
def _config_shapes(name: str, classes: int, kwargs: Tuple) -> Shapes:
  spec = registry.get_spec(name)
  block = dict(kwargs, name=name, num_classes=classes)
  f = hk.transform(lambda x: registry.model_from_config(block)(x, is_training=False))
  images = jax.ShapeDtypeStruct((1, spec.train_size, spec.train_size, 3), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), images)
  return {m: {n: tuple(v.shape) for n, v in ps.items()} for m, ps in shapes.items()}


def validate_config(params: Mapping[str, Mapping[str, Any]], model_config: Mapping[str, Any],
                    source: str = 'weights') -> None:
  """Checks names and shapes against the model a config's `model` block describes (a run's config.json),
  reporting every mismatch in one WeightsError."""
  bad = _mismatches(params, config_shapes(model_config))
  if bad:
    name, classes, kwargs = registry.model_kwargs(model_config)
    shape = ', '.join(f'{k}={v}' for k, v in kwargs.items() if k in ('width', 'depths'))
    raise WeightsError(f'{source}: parameters do not match the config\'s model {name!r} (num_classes='
                       f'{classes}{", " + shape if shape else ""}): {len(bad)} mismatches\n' + '\n'.join(bad))


def _mismatches(params: Mapping[str, Mapping[str, Any]], expected: Shapes) -> List[str]:
  missing, unexpected, wrong = [], [], []
  for module in sorted(set(expected) | set(params)):
    want, got = expected.get(module, {}), params.get(module, {})
    for name in sorted(set(want) | set(got)):
      key = f'{module}/{name}'
      if name not in got:
        missing.append(f'  missing:     {key} {want[name]}')
      elif name not in want:
        unexpected.append(f'  unexpected:  {key} {tuple(np.shape(got[name]))}')
      elif tuple(np.shape(got[name])) != tuple(want[name]):
        wrong.append(f'  wrong shape: {key} checkpoint {tuple(np.shape(got[name]))}, model {want[name]}')
  return missing + unexpected + wrong


def detect_model(params: Mapping[str, Mapping[str, Any]], num_classes: Optional[int] = None) -> str:
  """The registry NFNet whose parameter names and shapes a tree matches (e.g. 'F1', 'F0+', 'nfnet_tiny').

  Candidates are the NFNets with the tree's count of `nf_block` modules; widths decide between F and F+.
  """
  classes = _head_width(params, 1000) if num_classes is None else num_classes
  n_blocks = len(block_modules(params))
  candidates = [n for n in _nfnet_names() if _model_blocks(n) == n_blocks]
  for name in candidates:
    if not _mismatches(params, _expected_shapes(name, classes)):
      return name
  by_blocks = ', '.join(f'{n}={_model_blocks(n)}' for n in _nfnet_names())
  if not candidates:
    raise WeightsError(f'No registered NFNet has {n_blocks} nf_block modules (blocks per model: '
                       f'{by_blocks}); pass model_name to see every mismatch')
  raise WeightsError(f'The tree has {n_blocks} blocks like {candidates}, but its names or shapes match '
                     f'none of them at num_classes={classes}; pass model_name to see every mismatch')


def validate(params: Mapping[str, Mapping[str, Any]], model_name: Optional[str] = None,
             num_classes: Optional[int] = None, source: str = 'weights') -> str:
  """Checks names and shapes against a registry model, reporting every mismatch in one error.

  Args:
    model_name: registry name ('F0', 'F3+', 'nfnet_tiny', ...) or timm name ('dm_nfnet_f0'); None detects it.
    num_classes: None takes the classifier's width from the tree.
    source: what to call the tree in errors (usually its file).
  Returns:
    The registry model name.
  Raises:
    WeightsError listing every missing, unexpected and wrongly shaped parameter.
  """
  classes = _head_width(params, 1000) if num_classes is None else num_classes
  if model_name is None:
    try:
      return detect_model(params, classes)
    except WeightsError as e:
      raise WeightsError(f'{source}: {e}') from None
  model_name = registry_name(model_name)
  bad = _mismatches(params, _expected_shapes(model_name, classes))
  if bad:
    header = f'{source}: parameters do not match model {model_name!r} (num_classes={classes})'
    have, want = len(block_modules(params)), _model_blocks(model_name)
    if want is not None and have != want:
      alike = [n for n in _nfnet_names() if _model_blocks(n) == have]
      header += (f'; the checkpoint has {have} blocks, {model_name!r} has {want}'
                 + (f' (checkpoint looks like {" or ".join(alike)})' if alike else ''))
    counts = {k: sum(line.lstrip().startswith(k) for line in bad) for k in ('missing', 'unexpected', 'wrong')}
    header += (f': {counts["missing"]} missing, {counts["unexpected"]} unexpected, '
               f'{counts["wrong"]} wrong shape')
    raise WeightsError(header + '\n' + '\n'.join(bad))
  return model_name
