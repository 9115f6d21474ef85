"""The train and eval streams: the global batch at step s is a pure function of (seed, s).

Train: one global order over the train split, a fresh permutation per epoch drawn from the seed (Grain's
index shuffle); global batch s is positions [s*B, (s+1)*B) of that order, and process p of P decodes only
its contiguous slice [s*B + p*B/P, s*B + (p+1)*B/P), each example cropped and flipped with the key
(seed, position) (nfnets/data/decode.py). So resuming at step s reads step s directly (nothing is
replayed, nothing reseeded) and 1 or N processes train on the same global batches. The host decodes, crops,
flips and resizes (the reference code's dataset.py); MixUp/CutMix, RandAugment and normalisation follow on
the device (nfnets/data/device_augment.py).

Eval: the same layout, unshuffled: global batch k is examples [k*E, (k+1)*E) with padding (mask 0) past the
end, so every process has ceil(N / E) batches and every example is seen once.

Grain reads the records by index and runs the decoding in threads of this process, or in worker processes
(`dataset.num_workers`), with prefetching. Batches are NumPy arrays of this process's slice; the data
layer knows nothing of devices.
"""
import os
import sys
from typing import Iterator, Optional, Tuple

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from nfnets.batch_layout import check_batch_layout
from nfnets.data import decode, preprocess, sources
from nfnets.data.info import FAKE_NUM_CLASSES, FAKE_NUM_EVAL


def _process(index: Optional[int], count: Optional[int]) -> Tuple[int, int]:
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} must be in [0, process_count={count})')
  return index, count


def shuffle_seed(seed: int) -> int:
  """Grain's shuffle seed for a run seed. Grain seeds epoch e with base + e, so the base is hashed from the
  run seed: with base = seed, run seed 1's first epoch would be run seed 0's second."""
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def train_order(num_examples: int, seed: int) -> grain.MapDataset:
  """position -> example index: epoch e = positions [e*N, (e+1)*N) is a permutation of the N examples."""
  return grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed(seed)).repeat()


class GlobalPosition:
  """This process's element t -> its global position: element t is slot t % b of its step t // b, and the
  process holds slots [p*b, (p+1)*b) of each global batch of B (b = B / P)."""

  def __init__(self, global_batch: int, per_process: int, process_index: int, first_step: int = 0):
    self.global_batch, self.per_process = global_batch, per_process
    self.offset, self.first_step = process_index * per_process, first_step

  def __call__(self, t: int) -> int:
    step, slot = divmod(t, self.per_process)
    return (self.first_step + step) * self.global_batch + self.offset + slot


class BatchIterator:
  """NumPy batches of this process; counts and reports the examples skipped as undecodable.

  `num_skipped`: decode failures in the batches served so far (a file that fails in every epoch counts in
  every epoch). A long run logs them and carries on; `close()` stops Grain's worker processes.
  """

  def __init__(self, batches: Iterator[dict]):
    self._it = batches
    self.num_skipped = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    skipped = int(np.sum(batch.pop('skipped')))
    if skipped:
      self.num_skipped += skipped
      logging.warning('Input pipeline: %d undecodable images skipped so far', self.num_skipped)
    return batch

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close:
      close()


def _load(positions: grain.MapDataset, decoder, per_process: int, *, num_threads: int, num_workers: int = 0):
  """Grain iterator over the batches `decoder` makes of each `per_process` positions: each batch decoded by
  one thread (or worker process), `num_threads` (x `num_workers`) batches in flight."""
  if not num_workers:
    decode.use_tf_threads(num_threads)
  batches = positions.batch(per_process, drop_remainder=True, batch_fn=decoder)
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # Starting workers reads Grain's absl flags; a program that never parsed flags (a notebook,
      # pytest) uses their defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
                        worker_init_fn=decode.init_worker)
  return iter(ds)


def _parallelism(ds_config) -> Tuple[int, int]:
  workers = ds_config.get('num_workers') or 0
  threads = ds_config.get('num_threads') or (1 if workers else os.cpu_count() or 1)
  return threads, workers


def train_iterator(ds_config, *, global_batch_size: int, image_size: int, num_classes: int, seed: int,
                   start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> BatchIterator:
  """This process's slices of the global train batches from step `start_step` on: uint8 `images`
  [B / P, S, S, 3] and int32 `labels` [B / P], a pure function of (seed, step)."""
  index, count = _process(process_index, process_count)
  per_process = check_batch_layout(global_batch_size, 1, count, 1, field='global_batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  if ds_config.get('exact_resume') is not None:
    logging.warning('dataset.exact_resume is deprecated and does nothing: every resume starts the data '
                    'stream at its step, as the uninterrupted run would have read it')
  position = GlobalPosition(global_batch_size, per_process, index, start_step)
  if ds_config.name == 'fake':
    return BatchIterator(_fake_train(position, image_size, num_classes, seed))
  source = sources.get_source(ds_config)
  logging.info('%s', sources.describe(ds_config, source))
  if source.num_classes > num_classes:
    raise ValueError(f'{ds_config.name!r} has {source.num_classes} classes but the model has {num_classes}')
  aug = ds_config.augment
  decoder = decode.TrainDecoder(
      source.train, train_order(source.num_train, seed), seed=seed, encoded=source.encoded,
      image_size=image_size, random_crop=aug.random_crop, crop_area_min=aug.crop_area_min,
      random_flip=aug.random_flip)
  positions = grain.MapDataset.range(sys.maxsize).map(position)
  threads, workers = _parallelism(ds_config)
  return BatchIterator(_load(positions, decoder, per_process, num_threads=threads, num_workers=workers))


def eval_iterator(ds_config, *, global_batch_size: int, image_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, split: str = 'eval') -> Iterator[dict]:
  """One pass over the eval split (or, with `split='train'`, over the train split unshuffled and without
  augmentation, as a linear probe reads it): float32 `images` [E / P, S, S, 3] (0..255, not normalised),
  int32 `labels`, float32 `mask` (0: padding); the same number of batches on every process."""
  if split not in ('eval', 'train'):
    raise ValueError(f"split={split!r}: expected 'eval' or 'train'")
  index, count = _process(process_index, process_count)
  per_process = check_batch_layout(global_batch_size, 1, count, 1, field='eval_batch_size')
  position = GlobalPosition(global_batch_size, per_process, index)
  if ds_config.name == 'fake':
    return _fake_eval(position, image_size)
  source = sources.get_source(ds_config)
  records = source.eval if split == 'eval' else source.train
  num_batches = -(-len(records) // global_batch_size)
  decoder = decode.EvalDecoder(records, encoded=source.encoded, image_size=image_size,
                               resize_pad=preprocess.eval_resize_pad(image_size, ds_config.eval_resize_pad))
  positions = grain.MapDataset.range(num_batches * per_process).map(position)
  # Threads only: an eval iterator is made for every evaluation, and a worker process would import
  # TensorFlow again each time.
  threads, _ = _parallelism(ds_config)
  return _counted_eval(BatchIterator(_load(positions, decoder, per_process, num_threads=threads)),
                       len(records), split)


def _counted_eval(batches: BatchIterator, num_examples: int, split: str) -> Iterator[dict]:
  yield from batches
  if batches.num_skipped:
    logging.warning('%s split: %d of its %d examples could not be decoded and were left out',
                    split.capitalize(), batches.num_skipped, num_examples)


# ---------------------------------------------------------------------------------------------------- fake

def _fake_image(seed: int, variant: int, slot: int, image_size: int, dtype=np.uint8) -> np.ndarray:
  rng = np.random.default_rng([seed, variant, slot])
  return rng.integers(0, 256, (image_size, image_size, 3)).astype(dtype)


def _fake_train(position: GlobalPosition, image_size: int, num_classes: int, seed: int) -> Iterator[dict]:
  """Random uint8 images and labels, made once: two image batches that alternate, labels drawn per step.
  The step does not augment them (Experiment), so the input never limits a benchmark; still a function of
  (seed, step) and of the global slot, like the real stream."""
  b = position.per_process
  slots = range(position.offset, position.offset + b)
  images = [np.stack([_fake_image(seed, v, j, image_size) for j in slots]) for v in range(2)]
  step = position.first_step
  while True:
    labels = np.random.default_rng([seed, step]).integers(0, num_classes, position.global_batch)
    yield {'images': images[step % 2], 'labels': labels[position.offset:position.offset + b].astype(np.int32),
           'skipped': np.zeros(1, np.int32)}
    step += 1


def _fake_eval(position: GlobalPosition, image_size: int) -> Iterator[dict]:
  b, n = position.per_process, FAKE_NUM_EVAL
  images = np.stack([_fake_image(0, 2, j, image_size, np.float32) for j in range(b)])
  for k in range(-(-n // position.global_batch)):
    slots = np.array([position(k * b + j) for j in range(b)])
    yield {'images': images, 'labels': (slots * 7919 % FAKE_NUM_CLASSES).astype(np.int32),
           'mask': (slots < n).astype(np.float32)}
