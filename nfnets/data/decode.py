"""Decoding the example at one global position of the stream: the host part of the reference code's
dataset.py, called by Grain for each position (in threads of this process or in worker processes).

Each call decodes one record with the TF ops of nfnets/data/preprocess.py, traced once per setting and
process, the train crop and flip keyed by (seed, position). A record that cannot be read or decoded is
skipped: its train slot takes the example at the next position of the same order that decodes, so the
batch keeps its size and stays a function of (seed, step), and an eval slot becomes padding (mask 0).
Every failure is counted in the element's `skipped`; the first few are logged with the file they name.
"""
import functools

from absl import logging
import numpy as np
import tensorflow as tf

from nfnets.data import preprocess

MAX_CONSECUTIVE_FAILURES = 100   # then the data is not what the config says it is: stop with a clear error
MAX_LOGGED_FAILURES = 20         # per decoder and process; the count goes on (BatchIterator.num_skipped)


def _image_spec(encoded: bool) -> tf.TensorSpec:
  return tf.TensorSpec([], tf.string) if encoded else tf.TensorSpec([None, None, 3], tf.uint8)


@functools.lru_cache(maxsize=16)
def _train_fn(encoded: bool, image_size: int, random_crop: bool, crop_area_min: float, random_flip: bool):
  """(image, key int64 [2]) -> uint8 [S, S, 3]: crop, flip, bicubic resize, traced once per setting."""

  @tf.function(input_signature=[_image_spec(encoded), tf.TensorSpec([2], tf.int64)])
  def fn(image, key):
    out = preprocess.train_image(image, key, encoded=encoded, image_size=image_size, random_crop=random_crop,
                                 crop_area_min=crop_area_min, random_flip=random_flip)
    # Rounded, not truncated (unbiased): a quarter of the bytes to copy to the device, and RandAugment
    # works on uint8 pixels anyway; bicubic overshoot beyond 0..255 is clipped.
    return tf.cast(tf.round(tf.clip_by_value(out, 0, 255)), tf.uint8)

  return fn.get_concrete_function()


@functools.lru_cache(maxsize=16)
def _eval_fn(encoded: bool, image_size: int, resize_pad: int):
  """image -> float32 [S, S, 3] in 0..255, not rounded (the released weights' accuracies are measured on
  these crops)."""

  @tf.function(input_signature=[_image_spec(encoded)])
  def fn(image):
    return preprocess.eval_image(image, encoded=encoded, image_size=image_size, resize_pad=resize_pad)

  return fn.get_concrete_function()


def _reason(error: Exception) -> str:
  """One line of why: a TF op error's own line (after the graph's traceback, before its node), else the
  exception's text."""
  lines = [l for l in str(getattr(error, 'message', error)).splitlines() if l.strip()]
  own = [l for l in lines if not l[0].isspace() and not l.startswith('Graph execution error')]
  return (own or lines or [type(error).__name__])[-1].strip()


class _Decoder:
  """Logs the first MAX_LOGGED_FAILURES failures it meets (threads may race on the count: harmless)."""
  failures = 0

  def _log_failure(self, split, index: int, error: Exception) -> None:
    self.failures += 1
    if self.failures <= MAX_LOGGED_FAILURES:
      logging.warning('Skipping undecodable image %s: %s', split.describe(index), _reason(error))


class TrainDecoder(_Decoder):
  """position -> {'images' uint8 [S, S, 3], 'labels' int32, 'skipped' int32}: the example at `position` of
  `order` (position -> example index of `split`), cropped and flipped with the key (seed, position)."""

  def __init__(self, split, order, *, seed: int, encoded: bool, image_size: int, random_crop: bool,
               crop_area_min: float, random_flip: bool):
    self.split, self.order, self.seed, self.encoded = split, order, seed, encoded
    self.settings = (encoded, image_size, random_crop, float(crop_area_min), random_flip)

  def __call__(self, position: int) -> dict:
    fn = _train_fn(*self.settings)
    key = tf.constant([self.seed, position], tf.int64)
    for attempt in range(MAX_CONSECUTIVE_FAILURES):
      index = int(self.order[position + attempt])
      try:
        record = self.split[index]
        image = fn(tf.constant(record['image']), key).numpy()
      except (tf.errors.OpError, OSError) as e:
        self._log_failure(self.split, index, e)
        continue
      return {'images': image, 'labels': np.int32(record['label']), 'skipped': np.int32(attempt)}
    raise RuntimeError(f'{MAX_CONSECUTIVE_FAILURES} consecutive train examples from position {position} '
                       f'could not be decoded (the last: {self.split.describe(index)}); is '
                       'config.dataset.data_dir the data you meant?')


class EvalDecoder(_Decoder):
  """position -> {'images' float32 [S, S, 3], 'labels' int32, 'mask' float32, 'skipped' int32}: example
  `position` of `split`, or padding (mask 0) past its end and in place of an undecodable example."""

  def __init__(self, split, *, encoded: bool, image_size: int, resize_pad: int):
    self.split, self.settings = split, (encoded, image_size, resize_pad)

  def _padding(self, skipped: int) -> dict:
    size = self.settings[1]
    return {'images': np.zeros((size, size, 3), np.float32), 'labels': np.int32(0),
            'mask': np.float32(0), 'skipped': np.int32(skipped)}

  def __call__(self, position: int) -> dict:
    if position >= len(self.split):
      return self._padding(0)
    try:
      record = self.split[position]
      image = _eval_fn(*self.settings)(tf.constant(record['image'])).numpy()
    except (tf.errors.OpError, OSError) as e:
      self._log_failure(self.split, position, e)
      return self._padding(1)
    return {'images': image, 'labels': np.int32(record['label']), 'mask': np.float32(1),
            'skipped': np.int32(0)}


def init_worker(worker_index: int, worker_count: int) -> None:
  """Grain worker processes decode one example at a time each: TF's own thread pools would only add
  contention (and threads) to the worker count the config asked for."""
  del worker_index, worker_count
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
