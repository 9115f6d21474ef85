"""Train and eval batch iterators: sharded per process, batched [local_devices, per_device, ...].

Train (the reference code's dataset.py, host part): shuffle -> decode, crop, flip, bicubic resize -> uint8,
one decoded example per train image. MixUp/CutMix, RandAugment and normalisation follow on the device
(nfnets.data.device_augment), so the host's work per image is the decode and the resize.
Eval (the reference code's resize_crop_32): square resize to S + pad, centre crop S, float32 0..255 (not
rounded: the released weights' accuracies are measured on these); padded and masked to a common batch count.
The steps normalise on the device (nfnets.data.normalize).
"""
import math
from typing import Iterator, Optional, Tuple

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from nfnets.config_validation import check_batch_layout
from nfnets.data import preprocess, sources
from nfnets.data.info import FAKE_NUM_CLASSES, FAKE_NUM_EVAL


def _process(index: Optional[int], count: Optional[int]) -> Tuple[int, int]:
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} must be in [0, process_count={count})')
  return index, count


def _key(seed: int, process_index: int, stage: int, counter: tf.Tensor) -> tf.Tensor:
  """Stateless RNG key for one element of one stage: independent per seed, process and stage."""
  return tf.stack([tf.constant(seed * 1_000_003 + process_index * 8 + stage, tf.int64),
                   tf.cast(counter, tf.int64)])


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True   # parallel maps keep the order, so a seed fixes the stream
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


class BatchIterator:
  """numpy batches from a tf.data pipeline; counts examples dropped because they could not be decoded.

  `num_skipped`: unreadable files dropped when listing, plus decode failures seen so far (a file that fails
  every epoch counts every epoch). A long run logs these and carries on.
  """

  def __init__(self, batches: Iterator[dict], num_invalid: int = 0):
    self._it = batches
    self._num_invalid = num_invalid
    self.num_skipped = num_invalid

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    skipped = self._num_invalid + int(batch.pop('skipped').max())
    if skipped > self.num_skipped:
      logging.warning('Input pipeline: %d undecodable images skipped so far', skipped)
      self.num_skipped = skipped
    return batch


def train_iterator(ds_config, *, global_batch_size: int, image_size: int, num_classes: int, seed: int,
                   num_local_devices: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[dict]:
  """Infinite per-process train batches: uint8 `images` [devices, per_device, S, S, 3], int32 `labels`.

  MixUp/CutMix, RandAugment and normalisation run on the device (nfnets.data.device_augment).
  """
  index, count = _process(process_index, process_count)
  bs = check_batch_layout(global_batch_size, 1, count, num_local_devices)
  aug = ds_config.augment
  if ds_config.name == 'fake':
    return BatchIterator(_fake_train(bs, num_local_devices, image_size, num_classes, seed + index))
  source = sources.get_source(ds_config)
  if source.num_classes > num_classes:
    raise ValueError(f'{ds_config.name!r} has {source.num_classes} classes but the model has {num_classes}')

  ds, num_invalid = source.train(index, count)
  ds = ds.shuffle(ds_config.shuffle_buffer, seed=seed * 1_000_003 + index, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate()

  def crop(position, ex):
    image = preprocess.train_image(
        ex['image'], _key(seed, index, 0, position), encoded=source.encoded, image_size=image_size,
        random_crop=aug.random_crop, crop_area_min=aug.crop_area_min, random_flip=aug.random_flip)
    # Rounded, not truncated (unbiased): a quarter of the bytes to copy to the device, and RandAugment
    # works on uint8 pixels anyway; bicubic overshoot beyond 0..255 is clipped.
    pixels = tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)
    return position, {'images': pixels, 'labels': tf.cast(ex['label'], tf.int32)}

  ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
  # Positions run ahead of surviving elements by the number of decode failures so far.
  ds = ds.enumerate().map(lambda k, pe: dict(pe[1], skipped=pe[0] - k))
  ds = ds.batch(bs, drop_remainder=True).batch(num_local_devices, drop_remainder=True).prefetch(2)
  return BatchIterator(_options(ds).as_numpy_iterator(), num_invalid)


def eval_iterator(ds_config, *, global_batch_size: int, image_size: int, num_local_devices: int,
                  process_index: Optional[int] = None, process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over the eval split; the same number of batches on every process; `mask` 0 marks padding."""
  index, count = _process(process_index, process_count)
  bs = check_batch_layout(global_batch_size, 1, count, num_local_devices, field='eval_batch_size')
  per_process = bs * num_local_devices
  if ds_config.name == 'fake':
    return _fake_eval(bs, num_local_devices, image_size, index, count)
  source = sources.get_source(ds_config)
  sizes = source.eval_shard_sizes(count)
  num_batches = math.ceil(max(sizes) / per_process)
  ds, _ = source.eval(index, count)

  def prep(ex):
    image = preprocess.eval_image(ex['image'], encoded=source.encoded, image_size=image_size,
                                  resize_pad=ds_config.eval_resize_pad)
    return {'images': image, 'labels': ex['label'], 'mask': tf.constant(1.0)}

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
  pad = {'images': tf.zeros([image_size, image_size, 3]), 'labels': tf.constant(0, tf.int32),
         'mask': tf.constant(0.0)}
  # Padding to a fixed length keeps batch counts equal across processes even if a file fails to decode.
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * per_process)
  ds = _options(ds.batch(bs).batch(num_local_devices).prefetch(2))
  return _counted_eval(ds.as_numpy_iterator(), sizes[index])


def _counted_eval(batches, expected: int) -> Iterator[dict]:
  seen = 0
  for batch in batches:
    seen += int(batch['mask'].sum())
    yield batch
  if seen != expected:
    logging.warning('Eval shard had %d examples but only %d decoded; %d skipped', expected, seen,
                    expected - seen)


def _fake_train(bs, num_devices, image_size, num_classes, seed) -> Iterator[dict]:
  """Random uint8 images and int labels; the step does not augment them (Experiment), so the input never
  limits a benchmark."""
  rng = np.random.RandomState(seed)
  images = [rng.randint(0, 256, (num_devices, bs, image_size, image_size, 3)).astype(np.uint8)
            for _ in range(2)]
  step = 0
  while True:
    labels = rng.randint(0, num_classes, (num_devices, bs)).astype(np.int32)
    yield {'images': images[step % 2], 'labels': labels, 'skipped': np.zeros(1, np.int64)}
    step += 1


def _fake_eval(bs, num_devices, image_size, index, count) -> Iterator[dict]:
  sizes = [sources.shard_range(FAKE_NUM_EVAL, i, count) for i in range(count)]
  n = sizes[index][1] - sizes[index][0]
  per_process = bs * num_devices
  num_batches = math.ceil(max(e - s for s, e in sizes) / per_process)
  rng = np.random.RandomState(index)
  images = rng.uniform(0, 255, (num_devices, bs, image_size, image_size, 3)).astype(np.float32)
  for b in range(num_batches):
    mask = (np.arange(b * per_process, (b + 1) * per_process) < n).astype(np.float32)
    yield {'images': images, 'labels': rng.randint(0, FAKE_NUM_CLASSES, (num_devices, bs)).astype(np.int32),
           'mask': mask.reshape(num_devices, bs)}
