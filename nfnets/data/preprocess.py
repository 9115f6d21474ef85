"""Per-example train and eval preprocessing (the reference code's dataset.py; paper App. A), in TF: the
reference's own ops (the Inception crop sampler, JPEG decode-and-crop, bicubic resize), traced once per
setting and called per example by the stream's decoder (nfnets/data/decode.py).

Randomness is stateless: every function takes a `key` (int64 [2]), so a seed fixes every crop and flip.
Outputs are float32 in the 0..255 range, not clamped (bicubic overshoots, as in the reference); the
normalisation is applied on the device (nfnets.data.normalize).
"""
from typing import Optional

import tensorflow as tf

CENTER_CROP_PAD = 32   # the fallback crop keeps S / (S + 32) of the shorter side, as the reference
# The reference code's eval resize (resize_crop_32): to S + 32, centre crop S, at S >= 256 (F0's test size);
# below it the pad shrinks with S, so small images keep the same crop ratio 256 / 288.
REFERENCE_EVAL_PAD, REFERENCE_EVAL_SIZE = 32, 256


def eval_resize_pad(image_size: int, resize_pad: Optional[int] = None) -> int:
  """The eval resize pad: `resize_pad` when set, else 32 at S >= 256 and round(S * 32 / 256) below."""
  if resize_pad is not None:
    return resize_pad
  if image_size >= REFERENCE_EVAL_SIZE:
    return REFERENCE_EVAL_PAD
  return round(image_size * REFERENCE_EVAL_PAD / REFERENCE_EVAL_SIZE)


def center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """[y, x, h, w] of the centred square covering S / (S + 32) of the shorter side."""
  h, w = shape[0], shape[1]
  side = tf.cast(image_size / (image_size + CENTER_CROP_PAD) * tf.cast(tf.minimum(h, w), tf.float64), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def random_crop_window(shape: tf.Tensor, key: tf.Tensor, image_size: int, area_min: float) -> tf.Tensor:
  """Inception crop [y, x, h, w]; falls back to the centre crop when 10 attempts fail (the reference code)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.constant([[[0., 0., 1., 1.]]]), seed=key, min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(area_min, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler returns the whole image when every attempt fails.
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.cond(failed, lambda: center_crop_window(shape, image_size), lambda: window)


def decode_and_crop(image: tf.Tensor, encoded: bool, window_fn) -> tf.Tensor:
  """uint8 [h, w, 3] crop of `image` (encoded bytes or pixels); window_fn(shape) -> [y, x, h, w].

  JPEGs are cropped while decoding, which skips most of the decoding work for small crops.
  """
  if not encoded:
    y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
    return image[y:y + h, x:x + w]

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image))
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)

  def other():   # PNG, GIF, BMP; grayscale and RGBA become RGB
    pixels = tf.io.decode_image(image, channels=3, expand_animations=False)
    y, x, h, w = tf.unstack(window_fn(tf.shape(pixels)))
    return pixels[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
  if not encoded:
    return image
  return tf.io.decode_image(image, channels=3, expand_animations=False)


def train_image(image: tf.Tensor, key: tf.Tensor, *, encoded: bool, image_size: int, random_crop: bool,
                crop_area_min: float, random_flip: bool) -> tf.Tensor:
  """Crop (Inception-style, or centre when random_crop is off), flip, bicubic resize: float32 [S, S, 3]."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if random_crop:
    window_fn = lambda shape: random_crop_window(shape, crop_key, image_size, crop_area_min)
  else:
    window_fn = lambda shape: center_crop_window(shape, image_size)
  crop = decode_and_crop(image, encoded, window_fn)
  if random_flip:
    crop = tf.image.stateless_random_flip_left_right(crop, flip_key)
  resized = tf.image.resize(crop, [image_size, image_size], method='bicubic')
  return tf.ensure_shape(resized, [image_size, image_size, 3])


def eval_image(image: tf.Tensor, *, encoded: bool, image_size: int,
               resize_pad: Optional[int] = None) -> tf.Tensor:
  """Square bicubic resize of the whole image to S + pad (aspect not kept), centre crop S (the reference
  code's resize_crop_32). `resize_pad` None: `eval_resize_pad`'s rule."""
  resize_pad = eval_resize_pad(image_size, resize_pad)
  if resize_pad < 0:
    raise ValueError(f'eval_resize_pad must be >= 0, got {resize_pad}')
  big = image_size + resize_pad
  resized = tf.image.resize(decode(image, encoded), [big, big], method='bicubic')
  offset = (resize_pad + 1) // 2
  crop = resized[offset:offset + image_size, offset:offset + image_size]
  return tf.ensure_shape(crop, [image_size, image_size, 3])
