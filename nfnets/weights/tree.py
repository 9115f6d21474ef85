"""The weight tree every loader returns, its flat names, and the error every loader raises.

Parameters are Haiku's two-level tree `{module_path: {param_name: array}}`, e.g.
`params['NFNet/~/nf_block_3/~/conv1']['w']`, the layout of DeepMind's released weights (reference code,
deepmind-research/nfnets). Loaders return it as plain dicts of NumPy arrays, which `net.apply` accepts.

Flat names (`flatten` / `unflatten`): `key = module_path + '/' + param_name`, e.g.
`'NFNet/~/nf_block/~/conv0/w'`. Haiku parameter names never contain '/', so a key splits at its last '/'.
"""
import errno
import os
import re
from typing import Any, Dict, List, Mapping, Union

import numpy as np

Params = Dict[str, Dict[str, np.ndarray]]
PathLike = Union[str, 'os.PathLike[str]']

SEP = '/'  # between a module path and its parameter name in flat keys
ROOT = 'NFNet'  # the NFNet's top-level module name
BLOCK = re.compile(r'^nf_block(?:_(\d+))?$')  # 'nf_block', 'nf_block_1', ...


class WeightsError(ValueError):
  """A weights file that cannot be read, or whose parameters do not fit the model."""


def flatten(params: Mapping[str, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """`{module: {name: x}}` -> `{module + '/' + name: np.asarray(x)}`, sorted by key."""
  flat = {}
  for module in sorted(params):
    for name in sorted(params[module]):
      if SEP in name:
        raise WeightsError(f'Parameter name {name!r} of module {module!r} contains {SEP!r}; '
                           'flat names would be ambiguous')
      flat[f'{module}{SEP}{name}'] = np.asarray(params[module][name])
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """Inverse of `flatten`: splits each key at its last '/' into module path and parameter name."""
  params: Dict[str, Dict[str, Any]] = {}
  for key, value in flat.items():
    module, sep, name = key.rpartition(SEP)
    if not sep or not module or not name:
      raise WeightsError(f'Flat parameter key {key!r} is not of the form "module/path/param_name"')
    params.setdefault(module, {})[name] = value
  return params


def unflatten_file(flat: Mapping[str, Any], source: str) -> Dict[str, Dict[str, Any]]:
  """`unflatten` whose errors name the file, with a hint when the keys are timm's."""
  try:
    return unflatten(flat)
  except WeightsError as e:
    hint = ' (a timm state dict? use load_timm)' if any(k.startswith('stem.') for k in flat) else ''
    raise WeightsError(f'{source}: {e}{hint}') from None


def is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic))


def as_param_tree(obj: Any, source: str) -> Params:
  """Normalizes a loaded object to `{module: {name: ndarray}}`, refusing anything that is not numeric."""
  if not isinstance(obj, Mapping):
    raise WeightsError(f'{source}: expected a mapping of parameters, got {type(obj).__name__}')
  if 'params' in obj and isinstance(obj['params'], Mapping) and set(obj) <= {'params', 'state'}:
    obj = obj['params']  # {'params': ..., 'state': ...} as written by some training loops
  if obj and all(is_array(v) for v in obj.values()):
    obj = unflatten_file(obj, source)
  params: Params = {}
  bad = []
  for module, inner in obj.items():
    if not isinstance(module, str) or not isinstance(inner, Mapping):
      bad.append(f'{module!r}: {type(inner).__name__}')
      continue
    params[module] = {}
    for name, value in inner.items():
      if not isinstance(name, str) or not is_array(value) or np.asarray(value).dtype.kind not in 'biuf':
        bad.append(f'{module}/{name}: {type(value).__name__} {getattr(value, "dtype", "")}'.rstrip())
      else:
        params[module][name] = np.asarray(value)
  if bad:
    raise WeightsError(f'{source}: not a two-level {{module: {{name: numeric array}}}} tree; offending '
                       'entries:\n  ' + '\n  '.join(bad))
  return params


def block_modules(params: Mapping[str, Any]) -> List[str]:
  """The NFNet block modules of a tree ('NFNet/~/nf_block', 'NFNet/~/nf_block_1', ...)."""
  return [m for m in params if len(m.split('/~/')) == 2 and BLOCK.match(m.split('/~/')[1])]


def block_index(block: str) -> int:
  """'nf_block' -> 0, 'nf_block_7' -> 7."""
  return int(BLOCK.match(block).group(1) or 0)


def block_name(k: int) -> str:
  return 'nf_block' if k == 0 else f'nf_block_{k}'


def check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(errno.ENOENT, 'No weights file at this path', path)
