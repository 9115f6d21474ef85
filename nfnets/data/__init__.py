"""Input pipeline: sources (digits, fake, TFDS/ImageNet, image folder), augmentation, device prefetch.

The training loop uses `dataset_info`, `train_iterator`, `eval_iterator` and `prefetch_to_device`; batches
have a leading [local_devices, per_device] shape: each process's part of the global batch.
"""
import collections
from typing import Iterator, Optional

import jax

from nfnets import devices
from nfnets.data.info import DatasetInfo, dataset_info

__all__ = ['DatasetInfo', 'dataset_info', 'train_iterator', 'eval_iterator', 'prefetch_to_device']


def __getattr__(name):
  # The TF pipeline loads on first use (see nfnets/data/info.py).
  if name in ('train_iterator', 'eval_iterator'):
    from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def prefetch_to_device(iterator, size: int = 2,
                       sharding: Optional[jax.sharding.NamedSharding] = None) -> Iterator:
  """Yields each batch already on the devices as global arrays, `size` batches ahead, so copies overlap
  compute.

  `sharding` is the consuming step's (`nfnets.devices.device_sharding`; default: all devices): a batch
  placed with another sharding would make the step compile a second program for it.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  sharding = sharding or devices.device_sharding(devices.make_mesh())
  num_local = devices.local_device_count(sharding.mesh)

  def check(x):
    if x.shape[:1] != (num_local,):
      raise ValueError(f'batch leading axis {x.shape[:1]} must equal the {num_local} local devices')

  queue = collections.deque()
  for batch in iterator:
    jax.tree.map(check, batch)
    queue.append(devices.put(batch, sharding))   # asynchronous
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
