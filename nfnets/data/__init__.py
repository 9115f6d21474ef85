"""Input pipeline: sources (digits, fake, TFDS/ImageNet, image folder), augmentation, device prefetch.

The training loop uses `dataset_info`, `train_iterator`, `eval_iterator` and `prefetch_to_device`; batches
have a leading [local_devices, per_device] shape, as jax.pmap wants.
"""
import collections
from typing import Iterator

import jax
import numpy as np

from nfnets.data.info import DatasetInfo, dataset_info

__all__ = ['DatasetInfo', 'dataset_info', 'train_iterator', 'eval_iterator', 'prefetch_to_device',
           'device_sharding']


def __getattr__(name):
  # The TF pipeline loads on first use (see nfnets/data/info.py).
  if name in ('train_iterator', 'eval_iterator'):
    from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def device_sharding() -> jax.sharding.NamedSharding:
  """Axis 0 split over the local devices: jax.pmap (jit(shard_map) in JAX 0.10) takes it without a copy."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices'))


def prefetch_to_device(iterator, size: int = 2, sharding: jax.sharding.Sharding = None) -> Iterator:
  """Yields each batch already on the local devices, `size` batches ahead, so copies overlap compute.

  `sharding` should be the one the consuming pmap uses (its mesh axis named as the pmap axis): a batch
  placed with another sharding makes pmap compile a second program for it.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  sharding = sharding or device_sharding()
  num_devices = len(sharding.device_set)

  def put(x):
    if x.shape[:1] != (num_devices,):
      raise ValueError(f'batch leading axis {x.shape[:1]} must equal the {num_devices} local devices')
    return jax.device_put(x, sharding)   # asynchronous

  queue = collections.deque()
  for batch in iterator:
    queue.append(jax.tree.map(put, batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
