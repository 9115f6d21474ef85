"""Input pipeline: sources (digits, fake, TFDS/ImageNet, image folder) and augmentation.

The training loop uses `dataset_info`, `train_iterator` and `eval_iterator`; batches have a leading
[local_devices, per_device] shape: each process's part of the global batch.
"""
from nfnets.data.info import DatasetInfo, dataset_info

__all__ = ['DatasetInfo', 'dataset_info', 'train_iterator', 'eval_iterator']


def __getattr__(name):
  # The TF pipeline loads on first use (see nfnets/data/info.py).
  if name in ('train_iterator', 'eval_iterator'):
    from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
