"""RandAugment's 16 ops on uint8 [H, W, 3] images, in plain TF (tensorflow-addons is dead).

Geometric ops use ImageProjectiveTransformV3 with nearest sampling and fill 128, as the reference's
tfa-based ops. Each layer picks one op uniformly and applies it (the reference draws a probability but
never uses it for the selected op). Level -> argument mappings are the reference's (`levels`).

`ra_ops` picks how three ops behave (config: dataset.augment.ra_ops):
  'reference' (default): as DeepMind's reference autoaugment.py (a copy of the TPU EfficientNet one), the
    code behind the NFNet paper's numbers and its released weights; the default, so that training here
    follows the recipe that produced them:
    - Solarize compares a uint8 image with the threshold, which wraps modulo 256: magnitude 10 (threshold
      256 -> 0) inverts every pixel, magnitude 15 (384 -> 128) solarizes at 128.
    - Contrast blends towards a grey of H*W/256 (the sum of the grey histogram, i.e. the pixel count,
      divided by 256, where the mean was meant), clipped to 255 and truncated: 196 at 224 px, 255 from
      256 px up.
    - Sharpness truncates its 3x3 smoothing to uint8. The smoothing is computed exactly (integer sum,
      floor of /13); the reference's float32 kernel sometimes lands a hair below an exact multiple and
      truncates one lower, which depends on the conv's summation order and is not reproduced.
  'pil': PIL-exact ImageOps.solarize (a threshold >= 256 changes nothing), ImageEnhance.Contrast (towards
    the rounded mean grey level) and ImageEnhance.Sharpness (the smoothing rounds): the PIL ops that the
    AutoAugment / RandAugment papers (Cubuk et al. 2019, 2020) name.
All other ops, and the final blends (which truncate, as PIL's Image.blend does), are the same in both.
"""
import math

import tensorflow as tf

FILL = 128
MAX_LEVEL = 10.0
CUTOUT_CONST = 40
TRANSLATE_CONST = 100
RA_OPS = ('reference', 'pil')


def check_ra_ops(ra_ops: str) -> str:
  if ra_ops not in RA_OPS:
    raise ValueError(f'Unknown RandAugment ra_ops {ra_ops!r}; accepted: {", ".join(map(repr, RA_OPS))}')
  return ra_ops


def _split(key, n):
  return tf.unstack(tf.random.experimental.stateless_split(key, n))


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), clipped, truncated to uint8 (PIL and the reference)."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0, 255), tf.uint8)


def _transform(image: tf.Tensor, transform) -> tf.Tensor:
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2); outside is FILL."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(transform), tf.float32)[None],
      output_shape=tf.shape(image)[:2], fill_value=float(FILL), interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def rotate(image, degrees):
  """Counter-clockwise rotation about the centre."""
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  a = tf.cast(degrees, tf.float32) * math.pi / 180
  cos, sin = tf.cos(a), tf.sin(a)
  dx = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
  dy = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
  return _transform(image, [cos, -sin, dx, sin, cos, dy, 0., 0.])


def shear_x(image, level):
  return _transform(image, [1., level, 0., 0., 1., 0., 0., 0.])


def shear_y(image, level):
  return _transform(image, [1., 0., 0., level, 1., 0., 0., 0.])


def translate_x(image, pixels):
  """Shifts content right by `pixels`."""
  return _transform(image, [1., 0., -pixels, 0., 1., 0., 0., 0.])


def translate_y(image, pixels):
  return _transform(image, [1., 0., 0., 0., 1., -pixels, 0., 0.])


def invert(image):
  return 255 - image


def solarize(image, threshold, ra_ops='reference'):
  """Inverts values >= threshold; 'reference' takes the threshold modulo 256 (a uint8 comparison)."""
  threshold = tf.cast(threshold, tf.int32)
  if check_ra_ops(ra_ops) == 'reference':
    threshold = tf.math.floormod(threshold, 256)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def posterize(image, bits):
  """Keeps the top `bits` bits of each value (0 bits gives black)."""
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255]; a flat channel is left alone."""
  x = tf.cast(image, tf.float32)
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
  scale = tf.where(hi > lo, 255 / tf.maximum(hi - lo, 1), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.cast(tf.clip_by_value(x * scale + offset, 0, 255), tf.uint8)


def _equalize_channel(channel):
  hist = tf.math.bincount(tf.cast(tf.reshape(channel, [-1]), tf.int32), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  # PIL's ImageOps.equalize: step from all but the last occupied bin; lut[i] = (sum(hist[:i]) + step//2) // step.
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.concat([[0], tf.cumsum(hist)[:-1]], 0) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
  return tf.cond(step > 0, lambda: tf.gather(lut, tf.cast(channel, tf.int32)), lambda: channel)


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def color(image, factor):
  return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def contrast(image, factor, ra_ops='reference'):
  """Blends with a flat grey: 'pil' the rounded mean grey level, 'reference' min(H*W/256, 255) truncated."""
  if check_ra_ops(ra_ops) == 'reference':
    pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
    grey = tf.floor(tf.minimum(pixels / 256., 255.))
  else:
    grey = tf.floor(tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)) + 0.5)
  return blend(tf.fill(tf.shape(image), grey), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor, ra_ops='reference'):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, /13), rounded ('pil') or truncated ('reference');
  the one-pixel border stays as is."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]])
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  total = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]   # integers <= 3315: exact
  smooth = tf.floor(total / 13.) if check_ra_ops(ra_ops) == 'reference' else tf.round(total / 13.)
  smooth = tf.cast(tf.clip_by_value(smooth, 0, 255), tf.uint8)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def cutout(image, pad_size, key):
  """A FILL square of side 2*pad_size (clipped at the borders) at a uniform random centre."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ky, kx = _split(key, 2)
  cy = tf.random.stateless_uniform([], ky, 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], kx, 0, w, tf.int32)
  ys, xs = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  box = (ys >= cy - pad_size) & (ys < cy + pad_size) & (xs >= cx - pad_size) & (xs < cx + pad_size)
  return tf.where(box, tf.constant(FILL, tf.uint8), image)


def _signed(value, key):
  """value with a random sign, as the reference's _randomly_negate_tensor."""
  flip = tf.random.stateless_uniform([], key) < 0.5
  return tf.where(flip, -value, value)


def levels(magnitude: float) -> dict:
  """The reference's level -> argument mappings (level = magnitude / 10), before any random sign."""
  level = magnitude / MAX_LEVEL
  enhance = level * 1.8 + 0.1
  return {'Rotate': level * 30., 'Posterize': int(level * 4), 'Solarize': int(level * 256),
          'Color': enhance, 'Contrast': enhance, 'Brightness': enhance, 'Sharpness': enhance,
          'ShearX': level * 0.3, 'ShearY': level * 0.3, 'TranslateX': level * TRANSLATE_CONST,
          'TranslateY': level * TRANSLATE_CONST, 'Cutout': int(level * CUTOUT_CONST), 'SolarizeAdd': int(level * 110)}


def ops(magnitude: float, ra_ops: str = 'reference'):
  """The 16 ops as fn(image, key) at one magnitude; `ra_ops` as in the module docstring."""
  a, mode = levels(magnitude), check_ra_ops(ra_ops)
  return [
      ('AutoContrast', lambda x, k: autocontrast(x)),
      ('Equalize', lambda x, k: equalize(x)),
      ('Invert', lambda x, k: invert(x)),
      ('Rotate', lambda x, k: rotate(x, _signed(a['Rotate'], k))),
      ('Posterize', lambda x, k: posterize(x, a['Posterize'])),
      ('Solarize', lambda x, k: solarize(x, a['Solarize'], mode)),
      ('Color', lambda x, k: color(x, a['Color'])),
      ('Contrast', lambda x, k: contrast(x, a['Contrast'], mode)),
      ('Brightness', lambda x, k: brightness(x, a['Brightness'])),
      ('Sharpness', lambda x, k: sharpness(x, a['Sharpness'], mode)),
      ('ShearX', lambda x, k: shear_x(x, _signed(a['ShearX'], k))),
      ('ShearY', lambda x, k: shear_y(x, _signed(a['ShearY'], k))),
      ('TranslateX', lambda x, k: translate_x(x, _signed(a['TranslateX'], k))),
      ('TranslateY', lambda x, k: translate_y(x, _signed(a['TranslateY'], k))),
      ('Cutout', lambda x, k: cutout(x, a['Cutout'], k)),
      ('SolarizeAdd', lambda x, k: solarize_add(x, a['SolarizeAdd'])),
  ]


def randaugment(image: tf.Tensor, key: tf.Tensor, num_layers: int, magnitude: float,
                ra_ops: str = 'reference') -> tf.Tensor:
  """`num_layers` ops, each chosen uniformly, applied in sequence to a uint8 [H, W, 3] image."""
  if num_layers < 0 or magnitude < 0:
    raise ValueError(f'RandAugment needs num_layers >= 0 and magnitude >= 0, got {num_layers}, {magnitude}')
  fns = [fn for _, fn in ops(magnitude, ra_ops)]
  for layer_key in _split(key, num_layers) if num_layers else []:
    choose_key, op_key = _split(layer_key, 2)
    which = tf.random.stateless_uniform([], choose_key, 0, len(fns), tf.int32)
    image = tf.switch_case(which, [lambda f=f: tf.ensure_shape(f(image, op_key), image.shape) for f in fns])
  return image
