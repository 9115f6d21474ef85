"""DeepMind's released NFNet weights, `F0_haiku.npz` .. `F6_haiku.npz` (deepmind-research/nfnets).

Despite the name, each file is a dill pickle of the Haiku parameter tree; it is read with the restricted
unpickler of `safe_pickle`. A flat .npz from `export_npz` is accepted too (told apart by its zip header).
"""
import os
from typing import Optional

from nfnets.weights import npz
from nfnets.weights import safe_pickle
from nfnets.weights import validation
from nfnets.weights.tree import Params, PathLike, as_param_tree, check_exists, unflatten_file


def read_released(path: PathLike) -> Params:
  """Reads a released `F*_haiku.npz` (a dill pickle) or a flat .npz into a tree, without model checks."""
  path = os.fspath(path)
  check_exists(path)
  if npz.is_zip(path):
    return as_param_tree(unflatten_file(npz.read_flat(path), path), path)
  return as_param_tree(safe_pickle.load(path), path)


def load_released(path: PathLike, model_name: Optional[str] = None,
                  num_classes: Optional[int] = None) -> Params:
  """Loads DeepMind's released `F{0..6}_haiku.npz` (dill pickle) or a flat .npz from `export_npz`.

  Args:
    model_name: registry name to check against; None detects the variant from the tree.
    num_classes: None takes it from the classifier in the file.
  Returns:
    `{module: {name: np.ndarray}}` in the file's dtype (float32 for the released files), ready for
    `hk.transform(...).apply`.
  """
  path = os.fspath(path)
  params = read_released(path)
  validation.validate(params, model_name, num_classes, source=path)
  return params
