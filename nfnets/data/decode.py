"""Decoding the examples at a batch of global positions of the stream: the host part of the reference code's
dataset.py, called by Grain for each batch (in threads of this process or in worker processes).

A batch is decoded by one call of a traced TF function that maps the TF ops of nfnets/data/preprocess.py
over its examples, the train crop and flip of each keyed by (seed, position): one call per batch, since a
call costs about as much as decoding a small image. A record that cannot be read or decoded is skipped:
that batch is redone one example at a time (the same function on batches of one), the failed train slot
taking the example at the next position of the same order that decodes, so the batch keeps its size and
stays a function of (seed, step); a failed eval slot becomes padding (mask 0). Every failure is counted
in the batch's `skipped`; the first ones are logged with the file they name.
"""
import functools
from typing import List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from nfnets.data import preprocess

MAX_CONSECUTIVE_FAILURES = 100   # then the data is not what the config says it is: stop with a clear error
MAX_LOGGED_FAILURES = 20         # per decoder and process; the count goes on (BatchIterator.num_skipped)
_ERRORS = (tf.errors.OpError, OSError)   # undecodable, unreadable


def _images_spec(encoded: bool) -> tf.TensorSpec:
  return tf.TensorSpec([None], tf.string) if encoded else tf.TensorSpec([None, None, None, 3], tf.uint8)


@functools.lru_cache(maxsize=16)
def _train_fn(encoded: bool, image_size: int, random_crop: bool, crop_area_min: float, random_flip: bool):
  """(images [n], keys int64 [n, 2]) -> uint8 [n, S, S, 3]: crop, flip, bicubic resize each."""

  def one(image, key):
    out = preprocess.train_image(image, key, encoded=encoded, image_size=image_size, random_crop=random_crop,
                                 crop_area_min=crop_area_min, random_flip=random_flip)
    # Rounded, not truncated (unbiased): a quarter of the bytes to copy to the device, and RandAugment
    # works on uint8 pixels anyway; bicubic overshoot beyond 0..255 is clipped.
    return tf.cast(tf.round(tf.clip_by_value(out, 0, 255)), tf.uint8)

  @tf.function(input_signature=[_images_spec(encoded), tf.TensorSpec([None, 2], tf.int64)])
  def fn(images, keys):
    return tf.map_fn(lambda x: one(x[0], x[1]), (images, keys),
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8))

  return fn.get_concrete_function()


@functools.lru_cache(maxsize=16)
def _eval_fn(encoded: bool, image_size: int, resize_pad: int):
  """images [n] -> float32 [n, S, S, 3] in 0..255, not rounded (the released weights' accuracies are
  measured on these crops)."""

  @tf.function(input_signature=[_images_spec(encoded)])
  def fn(images):
    return tf.map_fn(
        lambda image: preprocess.eval_image(image, encoded=encoded, image_size=image_size, resize_pad=resize_pad),
        images, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))

  return fn.get_concrete_function()


def _reason(error: Exception) -> str:
  """One line of why: a TF op error's own line (after the graph's traceback, before its node), else the
  exception's text."""
  lines = [l for l in str(getattr(error, 'message', error)).splitlines() if l.strip()]
  own = [l for l in lines if not l[0].isspace() and not l.startswith('Graph execution error')]
  return (own or lines or [type(error).__name__])[-1].strip()


class _Decoder:
  """Reads records and logs the first MAX_LOGGED_FAILURES failures (threads may race on the count:
  harmless)."""
  failures = 0

  def __init__(self, split, encoded: bool):
    self.split, self.encoded = split, encoded

  def _log_failure(self, index: int, error: Exception) -> None:
    self.failures += 1
    if self.failures <= MAX_LOGGED_FAILURES:
      logging.warning('Skipping undecodable image %s: %s', self.split.describe(index), _reason(error))

  def _images(self, records: Sequence[dict]) -> tf.Tensor:
    images = [r['image'] for r in records]
    return tf.constant(images if self.encoded else np.stack(images))

  def _read_all(self, indices: Sequence[int]) -> Optional[List[dict]]:
    try:
      return [self.split[i] for i in indices]
    except OSError:
      return None   # the slow path finds which one, and says so


class TrainDecoder(_Decoder):
  """positions -> {'images' uint8 [n, S, S, 3], 'labels' int32 [n], 'skipped' int32}: the examples at
  those positions of `order` (position -> example index of `split`), each cropped and flipped with the
  key (seed, position)."""

  def __init__(self, split, order, *, seed: int, encoded: bool, image_size: int, random_crop: bool,
               crop_area_min: float, random_flip: bool):
    super().__init__(split, encoded)
    self.order, self.seed = order, seed
    self.settings = (encoded, image_size, random_crop, float(crop_area_min), random_flip)

  def _keys(self, positions: Sequence[int]) -> tf.Tensor:
    return tf.constant([[self.seed, g] for g in positions], tf.int64)

  def __call__(self, positions: Sequence[int]) -> dict:
    positions = [int(g) for g in positions]
    fn = _train_fn(*self.settings)
    records = self._read_all([int(self.order[g]) for g in positions])
    if records is not None:
      try:
        images = fn(self._images(records), self._keys(positions)).numpy()
        return {'images': images, 'labels': np.array([r['label'] for r in records], np.int32),
                'skipped': np.int32(0)}
      except tf.errors.OpError:
        pass
    examples = [self._one(fn, g) for g in positions]
    return {'images': np.stack([e[0] for e in examples]), 'labels': np.array([e[1] for e in examples], np.int32),
            'skipped': np.int32(sum(e[2] for e in examples))}

  def _one(self, fn, position: int):
    """(image, label, failures) for the slot at `position`: its example, or the next position's that
    decodes, with the slot's key."""
    for attempt in range(MAX_CONSECUTIVE_FAILURES):
      index = int(self.order[position + attempt])
      try:
        record = self.split[index]
        return fn(self._images([record]), self._keys([position])).numpy()[0], record['label'], attempt
      except _ERRORS as e:
        self._log_failure(index, e)
    raise RuntimeError(f'{MAX_CONSECUTIVE_FAILURES} consecutive train examples from position {position} '
                       f'could not be decoded (the last: {self.split.describe(index)}); is '
                       'config.dataset.data_dir the data you meant?')


class EvalDecoder(_Decoder):
  """positions -> {'images' float32 [n, S, S, 3], 'labels' int32, 'mask' float32, 'skipped' int32}:
  examples of `split` at those positions, padding (mask 0) past its end and for an undecodable one."""

  def __init__(self, split, *, encoded: bool, image_size: int, resize_pad: int):
    super().__init__(split, encoded)
    self.settings = (encoded, image_size, resize_pad)

  def __call__(self, positions: Sequence[int]) -> dict:
    size, n = self.settings[1], len(positions)
    real = [int(g) for g in positions if g < len(self.split)]
    out = {'images': np.zeros((n, size, size, 3), np.float32), 'labels': np.zeros(n, np.int32),
           'mask': np.zeros(n, np.float32), 'skipped': np.int32(0)}
    if not real:
      return out
    fn = _eval_fn(*self.settings)
    records, images = self._read_all(real), None
    if records is not None:
      try:
        images = fn(self._images(records)).numpy()
      except tf.errors.OpError:
        pass
    if images is None:   # redo one example at a time: the undecodable ones stay padding
      records, images = zip(*[self._one(fn, index) for index in real])
    for j, (record, image) in enumerate(zip(records, images)):   # the real positions come first
      if record is not None:
        out['images'][j], out['labels'][j], out['mask'][j] = image, record['label'], 1
    out['skipped'] = np.int32(sum(r is None for r in records))
    return out

  def _one(self, fn, index: int):
    """(record, image) of example `index`, or (None, None) when it cannot be read or decoded."""
    try:
      record = self.split[index]
      return record, fn(self._images([record])).numpy()[0]
    except _ERRORS as e:
      self._log_failure(index, e)
      return None, None


def use_tf_threads(num_threads: int) -> None:
  """Grain's threads (or worker processes) are the parallelism: TF runs each decoding call's ops one at a
  time (intra-op 1; its sharded resize otherwise costs ~10% more CPU per image in threads it spins), with
  an inter-op pool as large as the number of calls in flight. Only before TF's first op in the process:
  later its pools stay as they are."""
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
  except RuntimeError:   # TF already ran an op in this process
    pass


def init_worker(worker_index: int, worker_count: int) -> None:
  """Each Grain worker process decodes one batch at a time."""
  del worker_index, worker_count
  use_tf_threads(1)
