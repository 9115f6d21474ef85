"""NFNet weight files: DeepMind's released pickles, timm state dicts and flat .npz, and checks against a model.

Every loader returns Haiku's two-level tree `{module_path: {param_name: np.ndarray}}` (see `tree`), which
`hk.transform(...).apply` accepts directly.

  read(path)                      any weights file -> tree, without model checks (dispatches on the file)
  fit_to_template(loaded, template, source)
                                  a tree placed into freshly initialised params (new classifier allowed)
  read_released / load_released   DeepMind's `F*_haiku.npz` (restricted unpickler, `safe_pickle`)
  export_npz / load_npz           flat .npz, one array per `module/param` key
  to_timm / from_timm / load_timm / save_timm
                                  timm `dm_nfnet_f*` state dicts (.safetensors, .pth/.pt/.bin, .npz)
  expected_shapes / detect_model / validate / num_classes / count_params
                                  the tree against a registry model
  config_shapes / validate_config the tree against the model a config's `model` block describes

Errors are `WeightsError` (a ValueError) naming the file, `UnsafePickleError` (a WeightsError) for pickles
that ask for code, FileNotFoundError for missing files and ImportError when an optional package
(safetensors, torch) is needed. Training checkpoints (orbax, a run's workdir) are not read here.
"""
import os
from typing import Any, Mapping

from absl import logging
import numpy as np

from nfnets import param_groups
from nfnets.weights import npz
from nfnets.weights import safe_pickle
from nfnets.weights import timm
from nfnets.weights import tree
from nfnets.weights.npz import export_npz, load_npz
from nfnets.weights.released import load_released, read_released
from nfnets.weights.safe_pickle import ALLOWED_PICKLE_GLOBALS, UnsafePickleError
from nfnets.weights.timm import from_timm, load_timm, save_timm, to_timm
from nfnets.weights.tree import Params, PathLike, WeightsError, flatten, unflatten
from nfnets.weights.validation import count_params, detect_model, expected_shapes, num_classes
from nfnets.weights.validation import config_shapes, registry_name, validate, validate_config

__all__ = [
    'ALLOWED_PICKLE_GLOBALS', 'Params', 'UnsafePickleError', 'WeightsError', 'config_shapes', 'count_params',
    'detect_model',
    'expected_shapes', 'export_npz', 'fit_to_template', 'flatten', 'from_timm', 'load_npz', 'load_released',
    'load_timm', 'num_classes', 'read', 'read_released', 'registry_name', 'save_timm', 'to_timm',
    'unflatten', 'validate', 'validate_config',
]


def read(path: PathLike) -> Params:
  """The tree in a weights file, without model checks.

  Dispatches on the file: `.safetensors` / `.pth` / `.pt` / `.bin` / `.ckpt` are timm state dicts; a zip is
  a flat .npz (ours from `export_npz`, or timm names from `save_timm`, told apart by the keys); anything
  else is read as a released pickle by the restricted unpickler.
  """
  path = os.fspath(path)
  tree.check_exists(path)
  if os.path.splitext(path)[1].lower() in timm.SUFFIXES:
    return _from_timm_file(timm.read_timm_file(path), path)
  if npz.is_zip(path):
    flat = npz.read_flat(path)
    if timm.looks_like_timm(flat):
      return _from_timm_file(flat, path)
    return tree.as_param_tree(tree.unflatten_file(flat, path), path)
  return tree.as_param_tree(safe_pickle.load(path), path)


def _from_timm_file(state_dict: Mapping[str, Any], path: str) -> Params:
  try:
    return from_timm(state_dict)
  except WeightsError as e:
    raise WeightsError(f'{path}: {e}') from None


def fit_to_template(loaded: Mapping[str, Mapping[str, Any]], template: Mapping[str, Mapping[str, Any]],
                    source: str = 'weights') -> Params:
  """`loaded`'s arrays placed into `template` (freshly initialised params), cast to the template's dtypes.

  Every param must match by name and shape, except the classifier (`param_groups.is_classifier`: `linear`
  outside squeeze-excite), which keeps its fresh init when its shape differs: that is fine-tuning to a new
  class count.

  Raises:
    WeightsError listing the missing, extra and wrongly shaped params (the first 8), naming `source`.
  """
  out: Params = {}
  problems, reinit = [], []
  for module, ps in template.items():
    out[module] = {}
    for name, fresh in ps.items():
      got = loaded.get(module, {}).get(name)
      if got is not None and np.shape(got) == np.shape(fresh):
        out[module][name] = np.asarray(got, fresh.dtype)
      elif got is not None and param_groups.is_classifier(module) and name in ('w', 'b'):
        out[module][name] = fresh
        reinit.append(f'{module}/{name} {np.shape(got)} -> {np.shape(fresh)}')
      else:
        problems.append(f'{module}/{name}: ' + ('missing' if got is None else
                                                 f'shape {np.shape(got)} vs {np.shape(fresh)}'))
  extra = sorted(f'{m}/{n}' for m, ps in loaded.items() for n in ps if n not in template.get(m, {}))
  problems += [f'{e}: not in this model' for e in extra]
  if problems:
    raise WeightsError(f'Weights in {source} do not fit this model ({len(problems)} problems): '
                       + '; '.join(problems[:8]) + ('; ...' if len(problems) > 8 else ''))
  if reinit:
    logging.info('Re-initialised the classifier for the new class count: %s', ', '.join(reinit))
  return out
