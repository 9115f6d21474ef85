"""RandAugment's 16 ops on uint8 [H, W, 3] images as jitted JAX; runs on the device inside the train step.

Each op is a pure function of one image and its (traceable) arguments, so it jits and vmaps; `randaugment`
augments a batch [N, H, W, 3] from one `jax.random` key, with independent draws per image. Each layer picks
one op uniformly and applies it (the reference draws a probability but never uses it for the selected op).
Level -> argument mappings are the reference's (`levels`). Geometric ops sample the nearest pixel and fill
with 128, as TF's ImageProjectiveTransformV3 (NEAREST, CONSTANT) behind the reference's tfa-based ops.

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

The float32 arithmetic is TF's (tf.image's grey, the blends, the transform kernel), rounded step by step,
so each op gives the pixels of the TF ops the reference uses (checked op by op against them); only a
traced rotation angle may not (see _cos_sin). XLA's fused multiply-adds need care for that: see _product.
The random draws (op, sign, Cutout's centre) are jax.random's.

Under vmap a per-image choice evaluates every candidate and selects, so the ops come in three kinds that
share their expensive part: 8 are per-channel lookup tables over the 256 values (one gather applies the
chosen table), 5 are affine resamplings (one gather at the chosen transform's coordinates), and Color,
Sharpness and Cutout produce their image directly. A layer thus costs three candidate images, not 16.
"""
import math
import numbers
from typing import Callable, List, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

FILL = 128
MAX_LEVEL = 10.0
CUTOUT_CONST = 40
TRANSLATE_CONST = 100
RA_OPS = ('reference', 'pil')
NUM_OPS = 16
LUT, AFFINE, IMAGE = 'lut', 'affine', 'image'   # what an op's table entry returns; see _op_table


def check_ra_ops(ra_ops: str) -> str:
  if ra_ops not in RA_OPS:
    raise ValueError(f'Unknown RandAugment ra_ops {ra_ops!r}; accepted: {", ".join(map(repr, RA_OPS))}')
  return ra_ops


def _product(f, k, k_bits: int):
  """float32 f * k rounded once, as TF computes it, for integer-valued k with |k| < 2**k_bits <= 2**12.

  XLA fuses a multiply into the add that consumes it (an FMA: f * k + c rounded once where TF rounds the
  product first; seen on CPU, where no XLA flag turns it off), which moves a truncated value or a nearest
  pixel by one where it lands on a boundary. So f is split into a high part of 24 - k_bits significant bits and the rest
  (at most k_bits bits): both products with k are exact, and their sum is rounded once, fused or not.
  """
  f = jnp.asarray(f, jnp.float32)
  mask = jnp.int32(-(1 << k_bits))   # clears the low k_bits bits of the 23-bit mantissa
  hi = lax.bitcast_convert_type(lax.bitcast_convert_type(f, jnp.int32) & mask, jnp.float32)
  return hi * k + (f - hi) * k


def blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """degenerate + factor * (image - degenerate) in float32, clipped, truncated to uint8 (PIL and the
  reference); both images hold values in 0..255."""
  d, x = jnp.asarray(degenerate, jnp.float32), jnp.asarray(image, jnp.float32)
  return jnp.clip(d + _product(factor, x - d, 8), 0, 255).astype(jnp.uint8)


# --- Lookup-table ops: a [256, 3] uint8 table gives each channel's new value for each old one ------------

def _values() -> jax.Array:
  return jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32)[:, None], (256, 3))


def apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
  """out[y, x, c] = lut[image[y, x, c], c]."""
  return jnp.take_along_axis(lut, image.reshape(-1, 3).astype(jnp.int32), axis=0).reshape(image.shape)


def _invert_lut() -> jax.Array:
  return (255 - _values()).astype(jnp.uint8)


def _solarize_lut(threshold, ra_ops: str) -> jax.Array:
  threshold = jnp.asarray(threshold, jnp.int32)
  if check_ra_ops(ra_ops) == 'reference':
    threshold = threshold % 256   # the reference compares uint8 pixels with a uint8 threshold
  v = _values()
  return jnp.where(v < threshold, v, 255 - v).astype(jnp.uint8)


def _solarize_add_lut(addition, threshold=128) -> jax.Array:
  v = _values()
  return jnp.where(v < threshold, jnp.clip(v + addition, 0, 255), v).astype(jnp.uint8)


def _posterize_lut(bits) -> jax.Array:
  shift = 8 - jnp.clip(jnp.asarray(bits, jnp.int32), 0, 8)
  return ((_values() >> shift) << shift).astype(jnp.uint8)


def _autocontrast_lut(image: jax.Array) -> jax.Array:
  lo = jnp.min(image, axis=(0, 1)).astype(jnp.float32)
  hi = jnp.max(image, axis=(0, 1)).astype(jnp.float32)
  scale = jnp.where(hi > lo, 255 / jnp.maximum(hi - lo, 1), 1.0)
  offset = jnp.where(hi > lo, -_product(scale, lo, 8), 0.0)
  return jnp.clip(_product(scale, _values().astype(jnp.float32), 8) + offset, 0, 255).astype(jnp.uint8)


def _equalize_lut(image: jax.Array) -> jax.Array:
  # One 768-bin histogram (channel c at bins 256 c ...) by scatter-add: no [H*W, 256] one-hot.
  flat = image.reshape(-1, 3).astype(jnp.int32) + 256 * jnp.arange(3)
  hist = jnp.bincount(flat.reshape(-1), length=768).reshape(3, 256).T   # [256, 3]
  # PIL's ImageOps.equalize: step from all but the last occupied bin; lut[i] = (sum(hist[:i]) + step//2) // step.
  last = 255 - jnp.argmax(hist[::-1] > 0, axis=0)
  step = (image.shape[0] * image.shape[1] - hist[last, jnp.arange(3)]) // 255
  lut = jnp.clip((jnp.cumsum(hist, axis=0) - hist + step // 2) // jnp.maximum(step, 1), 0, 255)
  return jnp.where(step > 0, lut, _values()).astype(jnp.uint8)


def _brightness_lut(factor) -> jax.Array:
  return blend(jnp.zeros((256, 3)), _values(), factor)


# tf.image.rgb_to_grayscale's float32 terms (value * float32(1/255)) * weight, one per value and channel,
# rounded here by NumPy: XLA would fuse the multiplies into the sum (see _product), which moves 26 of the
# 2^24 colours' grey by one.
_GREY_TERMS = (np.arange(256, dtype=np.float32)[:, None] * np.float32(1 / 255)) * np.float32([0.2989, 0.587, 0.114])


def _grey(image: jax.Array) -> jax.Array:
  """tf.image.rgb_to_grayscale of a uint8 image, exactly: ITU-R 601 weights, summed in order, *255.5, truncated."""
  terms = jnp.take_along_axis(jnp.asarray(_GREY_TERMS), image.reshape(-1, 3).astype(jnp.int32), axis=0)
  return (((terms[:, 0] + terms[:, 1]) + terms[:, 2]) * 255.5).astype(jnp.uint8).reshape(image.shape[:2])


def _contrast_lut(image: jax.Array, factor, ra_ops: str) -> jax.Array:
  h, w = image.shape[0], image.shape[1]
  if check_ra_ops(ra_ops) == 'reference':
    grey = jnp.float32(math.floor(min(h * w / 256, 255)))
  else:   # the mean grey rounded half up, in integers: TF's float32 mean exactly while its sum is (<= 256^2 px)
    grey = ((2 * jnp.sum(_grey(image), dtype=jnp.int32) + h * w) // (2 * h * w)).astype(jnp.float32)
  return blend(jnp.broadcast_to(grey, (256, 3)), _values(), factor)


def invert(image):
  return apply_lut(image, _invert_lut())


def solarize(image, threshold, ra_ops='reference'):
  """Inverts values >= threshold; 'reference' takes the threshold modulo 256 (a uint8 comparison)."""
  return apply_lut(image, _solarize_lut(threshold, ra_ops))


def solarize_add(image, addition, threshold=128):
  return apply_lut(image, _solarize_add_lut(addition, threshold))


def posterize(image, bits):
  """Keeps the top `bits` bits of each value (0 bits gives black)."""
  return apply_lut(image, _posterize_lut(bits))


def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255]; a flat channel is left alone."""
  return apply_lut(image, _autocontrast_lut(image))


def equalize(image):
  """PIL's ImageOps.equalize, per channel."""
  return apply_lut(image, _equalize_lut(image))


def brightness(image, factor):
  return apply_lut(image, _brightness_lut(factor))


def contrast(image, factor, ra_ops='reference'):
  """Blends with a flat grey: 'pil' the rounded mean grey level, 'reference' min(H*W/256, 255) truncated."""
  return apply_lut(image, _contrast_lut(image, factor, ra_ops))


# --- Ops that build their image directly ------------------------------------------------------------------

def color(image, factor):
  return blend(jnp.repeat(_grey(image)[..., None], 3, axis=-1), image, factor)


def sharpness(image, factor, ra_ops='reference'):
  """Blend with PIL's SMOOTH filter (3x3, centre 5, /13), rounded ('pil') or truncated ('reference');
  the one-pixel border stays as is."""
  x, (h, w) = image.astype(jnp.int32), image.shape[:2]
  total = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] * (5 if dy == dx == 0 else 1)
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))   # integers: exact, unlike a float32 conv
  smooth = total // 13 if check_ra_ops(ra_ops) == 'reference' else (total + 6) // 13
  return blend(image.at[1:-1, 1:-1].set(smooth.astype(jnp.uint8)), image, factor)


def cutout(image, pad_size, key):
  """A FILL square of side 2*pad_size (clipped at the borders) at a uniform random centre."""
  h, w = image.shape[:2]
  ky, kx = jax.random.split(key)
  cy, cx = jax.random.randint(ky, (), 0, h), jax.random.randint(kx, (), 0, w)
  ys, xs = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  box = (ys >= cy - pad_size) & (ys < cy + pad_size) & (xs >= cx - pad_size) & (xs < cx + pad_size)
  return jnp.where(box, jnp.uint8(FILL), image)


# --- Affine ops: a transform [a0, a1, a2, b0, b1, b2]; output (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)

def affine_transform(image: jax.Array, transform: jax.Array) -> jax.Array:
  """Nearest-pixel resampling, FILL outside; TF's ImageProjectiveTransformV3 (NEAREST, CONSTANT) exactly.

  As TF's kernel: float32 coordinates, rounded half away from zero (std::round, not jnp.round's half to
  even), then filled where the rounded pixel is outside the image (so -0.3 reads column 0, -0.5 is FILL).
  """
  h, w = image.shape[:2]
  if max(h, w) > 4096:
    raise ValueError(f'affine_transform takes images up to 4096 px a side, got {h}x{w}')
  t = jnp.asarray(transform, jnp.float32)
  ys, xs = jnp.arange(h, dtype=jnp.float32)[:, None], jnp.arange(w, dtype=jnp.float32)[None, :]
  in_x = (_product(t[0], xs, 12) + _product(t[1], ys, 12)) + t[2]
  in_y = (_product(t[3], xs, 12) + _product(t[4], ys, 12)) + t[5]
  rx = lax.round(in_x, lax.RoundingMethod.AWAY_FROM_ZERO)
  ry = lax.round(in_y, lax.RoundingMethod.AWAY_FROM_ZERO)
  inside = (rx >= 0) & (rx <= w - 1) & (ry >= 0) & (ry <= h - 1)   # compared as floats: no int overflow
  ix, iy = jnp.where(inside, rx, 0).astype(jnp.int32), jnp.where(inside, ry, 0).astype(jnp.int32)
  sampled = image.reshape(h * w, 3)[(iy * w + ix).reshape(-1)].reshape(image.shape)
  return jnp.where(inside[..., None], sampled, jnp.uint8(FILL))


def _cos_sin(degrees):
  """cos and sin of `degrees` in float32 as TF's ops give them: of float32(degrees) * float32(pi) / 180,
  correctly rounded. Exact from a Python number; from a traced one XLA's, which divide by 180 through a
  rounded reciprocal and may round cos / sin the other way, so a pixel on a rounding boundary can move."""
  if isinstance(degrees, numbers.Real):
    a = np.float32(degrees) * np.float32(math.pi) / np.float32(180)
    return np.float32(math.cos(a)), np.float32(math.sin(a))
  a = jnp.asarray(degrees, jnp.float32) * math.pi / 180
  return jnp.cos(a), jnp.sin(a)


def _rotate_transform(cos, sin, h: int, w: int) -> jax.Array:
  dx = ((w - 1) - (_product(cos, w - 1, 12) - _product(sin, h - 1, 12))) / 2   # keeps the centre fixed
  dy = ((h - 1) - (_product(sin, w - 1, 12) + _product(cos, h - 1, 12))) / 2
  return jnp.stack([cos, -sin, dx, sin, cos, dy])


def _affine(*entries) -> jax.Array:
  return jnp.stack([jnp.asarray(e, jnp.float32) for e in entries])


def _shear_x_transform(level):
  return _affine(1., level, 0., 0., 1., 0.)


def _shear_y_transform(level):
  return _affine(1., 0., 0., level, 1., 0.)


def _translate_x_transform(pixels):
  return _affine(1., 0., -jnp.asarray(pixels, jnp.float32), 0., 1., 0.)


def _translate_y_transform(pixels):
  return _affine(1., 0., 0., 0., 1., -jnp.asarray(pixels, jnp.float32))


def rotate(image, degrees):
  """Counter-clockwise rotation about the centre."""
  return affine_transform(image, _rotate_transform(*_cos_sin(degrees), *image.shape[:2]))


def shear_x(image, level):
  return affine_transform(image, _shear_x_transform(level))


def shear_y(image, level):
  return affine_transform(image, _shear_y_transform(level))


def translate_x(image, pixels):
  """Shifts content right by `pixels`."""
  return affine_transform(image, _translate_x_transform(pixels))


def translate_y(image, pixels):
  return affine_transform(image, _translate_y_transform(pixels))


# --- The op table and RandAugment -------------------------------------------------------------------------

def _sign(key):
  """-1 or 1 with equal chances, as the reference's _randomly_negate_tensor."""
  return jnp.where(jax.random.uniform(key) < 0.5, jnp.float32(-1), jnp.float32(1))


def levels(magnitude: float) -> dict:
  """The reference's level -> argument mappings (level = magnitude / 10), before any random sign."""
  level = magnitude / MAX_LEVEL
  enhance = level * 1.8 + 0.1
  return {'Rotate': level * 30., 'Posterize': int(level * 4), 'Solarize': int(level * 256),
          'Color': enhance, 'Contrast': enhance, 'Brightness': enhance, 'Sharpness': enhance,
          'ShearX': level * 0.3, 'ShearY': level * 0.3, 'TranslateX': level * TRANSLATE_CONST,
          'TranslateY': level * TRANSLATE_CONST, 'Cutout': int(level * CUTOUT_CONST), 'SolarizeAdd': int(level * 110)}


def _op_table(magnitude: float, ra_ops: str) -> List[Tuple[str, str, Callable]]:
  """(name, kind, fn(image, key)) in the reference's order; fn returns a [256, 3] table (LUT), a transform
  (AFFINE) or the output image (IMAGE)."""
  a, mode = levels(magnitude), check_ra_ops(ra_ops)
  cos, sin = _cos_sin(a['Rotate'])   # a random sign flips sin only: both stay exact
  return [
      ('AutoContrast', LUT, lambda x, k: _autocontrast_lut(x)),
      ('Equalize', LUT, lambda x, k: _equalize_lut(x)),
      ('Invert', LUT, lambda x, k: _invert_lut()),
      ('Rotate', AFFINE, lambda x, k: _rotate_transform(cos, _sign(k) * sin, *x.shape[:2])),
      ('Posterize', LUT, lambda x, k: _posterize_lut(a['Posterize'])),
      ('Solarize', LUT, lambda x, k: _solarize_lut(a['Solarize'], mode)),
      ('Color', IMAGE, lambda x, k: color(x, a['Color'])),
      ('Contrast', LUT, lambda x, k: _contrast_lut(x, a['Contrast'], mode)),
      ('Brightness', LUT, lambda x, k: _brightness_lut(a['Brightness'])),
      ('Sharpness', IMAGE, lambda x, k: sharpness(x, a['Sharpness'], mode)),
      ('ShearX', AFFINE, lambda x, k: _shear_x_transform(_sign(k) * a['ShearX'])),
      ('ShearY', AFFINE, lambda x, k: _shear_y_transform(_sign(k) * a['ShearY'])),
      ('TranslateX', AFFINE, lambda x, k: _translate_x_transform(_sign(k) * a['TranslateX'])),
      ('TranslateY', AFFINE, lambda x, k: _translate_y_transform(_sign(k) * a['TranslateY'])),
      ('Cutout', IMAGE, lambda x, k: cutout(x, a['Cutout'], k)),
      ('SolarizeAdd', LUT, lambda x, k: _solarize_add_lut(a['SolarizeAdd'])),
  ]


_APPLY = {LUT: apply_lut, AFFINE: affine_transform, IMAGE: lambda image, out: out}


def ops(magnitude: float, ra_ops: str = 'reference'):
  """The 16 ops as (name, fn(image, key) -> image) at one magnitude; `ra_ops` as in the module docstring."""
  return [(name, lambda x, k, fn=fn, kind=kind: _APPLY[kind](x, fn(x, k)))
          for name, kind, fn in _op_table(magnitude, ra_ops)]



def _draws(key, num_images: int, num_layers: int):
  """Per image and layer, the op index and the op's own key; image i's draws do not depend on N."""
  def per_image(i):
    keys = jax.random.split(jax.random.fold_in(key, i), (num_layers, 2))
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, NUM_OPS))(keys[:, 0]), keys[:, 1]
  return jax.vmap(per_image)(jnp.arange(num_images))


def op_indices(key, num_images: int, num_layers: int) -> jax.Array:
  """The op index (into `ops`) that `randaugment` applies at each layer of each image: int32 [N, layers]."""
  return _draws(key, num_images, num_layers)[0]


def _layer(image, which, key, table):
  """One layer on one image: each kind's candidate from its chosen member, then the chosen kind's."""
  kinds = (LUT, AFFINE, IMAGE)
  candidates = []
  for kind in kinds:
    members = [i for i, (_, k, _) in enumerate(table) if k == kind]
    slot = jnp.asarray([members.index(i) if i in members else 0 for i in range(NUM_OPS)])[which]
    params = [table[i][2](image, key) for i in members]
    candidates.append(_APPLY[kind](image, lax.select_n(slot, *params)))
  return lax.select_n(jnp.asarray([kinds.index(k) for _, k, _ in table])[which], *candidates)


def randaugment(images: jax.Array, key: jax.Array, num_layers: int, magnitude: float,
                ra_ops: str = 'reference') -> jax.Array:
  """`num_layers` ops, each chosen uniformly per image, applied in sequence to uint8 [N, H, W, 3] images.

  num_layers, magnitude and ra_ops are static; key is a jax.random key, folded with each image's index.
  """
  if num_layers < 0 or magnitude < 0:
    raise ValueError(f'RandAugment needs num_layers >= 0 and magnitude >= 0, got {num_layers}, {magnitude}')
  table = _op_table(magnitude, ra_ops)
  if num_layers == 0:
    return images
  which, keys = _draws(key, images.shape[0], num_layers)

  def one(image, which, keys):
    return lax.scan(lambda x, wk: (_layer(x, *wk, table), None), image, (which, keys))[0]
  return jax.vmap(one)(images, which, keys)
