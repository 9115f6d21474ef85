"""The replicated train state and the host<->device helpers for pmap's leading device axis."""
from typing import Any, NamedTuple, Optional

import jax
import numpy as np


class TrainState(NamedTuple):
  step: Any        # 0-based index of the next step
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Any         # base key; each step folds in (step, process, device)
  bad_step: Any    # first step whose loss or gradient was not finite, -1 if none


def replicate(tree, n: Optional[int] = None):
  """Stacks a host tree along a new leading device axis, as pmap inputs."""
  n = n or jax.local_device_count()
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree):
  """The first local device's copy of a replicated tree, as NumPy."""
  def first(x):
    if hasattr(x, 'addressable_shards'):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)
