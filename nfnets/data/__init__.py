"""Input pipeline: sources with random access (digits, fake, TFDS in ArrayRecord format, an image folder),
the (seed, step) -> global batch stream, host preprocessing, device augmentation.

The training loop uses `dataset_info`, `train_iterator` and `eval_iterator`; batches are NumPy arrays of this
process's contiguous slice of the global batch ([global_batch / processes, ...]); placing them on devices is
the caller's business.
"""
from nfnets.data.info import DatasetInfo, dataset_info

__all__ = ['DatasetInfo', 'dataset_info', 'train_iterator', 'eval_iterator']


def __getattr__(name):
  # The pipeline (Grain, and TensorFlow for decoding) loads on first use (see nfnets/data/info.py).
  if name in ('train_iterator', 'eval_iterator'):
    from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
