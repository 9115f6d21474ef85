"""Flat .npz weights: one array per `module/param` key (see `tree.flatten`), no pickles inside.

Every write goes to a temporary file in the destination folder that replaces the destination only once
complete, so a failed export never leaves a half-written file under the final name.
"""
import os
import tempfile
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from nfnets.weights import validation
from nfnets.weights.tree import Params, PathLike, WeightsError, as_param_tree, check_exists, flatten
from nfnets.weights.tree import unflatten_file


def is_zip(path: str) -> bool:
  """True for a zip archive (.npz), False for anything else (the released pickles)."""
  with open(path, 'rb') as f:
    return f.read(4) == b'PK\x03\x04'


def read_flat(path: str) -> Dict[str, np.ndarray]:
  """`{key: array}` of an .npz, read without allowing pickles."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise WeightsError(f'{path}: truncated or corrupt .npz weights file ({type(e).__name__}: {e})') from e


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Calls `write(f)` on a temporary file next to `path`, which replaces `path` only if it succeeds."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def write_flat(flat: Mapping[str, np.ndarray], f) -> None:
  """Writes `{key: array}` as an .npz to the open binary file `f`, refusing object arrays."""
  # np.savez's own keyword names ('file', 'allow_pickle') could collide with keys, so write the zip here.
  with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
    for key, value in flat.items():
      with zf.open(key + '.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def export_npz(params: Mapping[str, Mapping[str, Any]], path: PathLike) -> None:
  """Writes params as a plain .npz, one array per `module/param` key (see `flatten`); no pickles inside."""
  flat = flatten(params)
  atomic_write(os.fspath(path), lambda f: write_flat(flat, f))


def load_npz(path: PathLike, model_name: Optional[str] = None, num_classes: Optional[int] = None,
             check: bool = True) -> Params:
  """Reads a flat .npz from `export_npz`; `check=False` skips the comparison with the registry model."""
  path = os.fspath(path)
  check_exists(path)
  params = as_param_tree(unflatten_file(read_flat(path), path), path)
  if check:
    validation.validate(params, model_name, num_classes, source=path)
  return params
