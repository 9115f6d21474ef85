"""RandAugment ops against NumPy / PIL references on fixed images, and the op table's level mappings.

Solarize, Contrast and Sharpness are checked in both `ra_ops` modes: 'reference' (the NFNet reference code's
behaviour, the default) against NumPy re-implementations, 'pil' against PIL itself."""
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from nfnets.data import randaugment as ra

RNG = np.random.RandomState(0)
# A natural-ish image: smooth gradients plus noise, not using the full 0..255 range (AutoContrast has work).
_yy, _xx = np.mgrid[0:24, 0:24]
IMAGE = np.clip(np.stack([_yy * 5 + 40, _xx * 4 + 60, (_yy + _xx) * 3 + 20], -1) + RNG.randint(0, 20, (24, 24, 3)),
                0, 255).astype(np.uint8)
KEY = tf.constant([1, 2], tf.int64)
MODES = ('reference', 'pil')


def run(fn, *args):
  return fn(tf.constant(IMAGE), *args).numpy()


def test_invert_solarize_posterize_match_numpy():
  np.testing.assert_array_equal(run(ra.invert), 255 - IMAGE)
  np.testing.assert_array_equal(run(ra.solarize, 128), np.where(IMAGE < 128, IMAGE, 255 - IMAGE))
  np.testing.assert_array_equal(run(ra.posterize, 2), IMAGE & 0b11000000)
  np.testing.assert_array_equal(run(ra.posterize, 0), np.zeros_like(IMAGE))
  added = np.clip(IMAGE.astype(int) + 55, 0, 255)
  np.testing.assert_array_equal(run(ra.solarize_add, 55), np.where(IMAGE < 128, added, IMAGE))


def test_autocontrast_and_equalize_match_pil():
  pil = Image.fromarray(IMAGE)
  np.testing.assert_allclose(run(ra.autocontrast), np.asarray(ImageOps.autocontrast(pil)), atol=1)
  np.testing.assert_array_equal(run(ra.equalize), np.asarray(ImageOps.equalize(pil)))


@pytest.mark.parametrize('name,pil_cls,factor', [('brightness', ImageEnhance.Brightness, 1.6),
                                                 ('color', ImageEnhance.Color, 0.3)])
def test_brightness_and_color_match_pil(name, pil_cls, factor):
  expected = np.asarray(pil_cls(Image.fromarray(IMAGE)).enhance(factor)).astype(int)
  got = run(getattr(ra, name), factor).astype(int)
  assert np.abs(got - expected).max() <= 1, name   # Color: TF's grey weights differ from PIL's by a hair


# --- Solarize, Contrast, Sharpness in both modes -----------------------------------------------------------

def np_blend(degenerate, image, factor):
  """The reference's blend: in float32, clipped, truncated to uint8."""
  d = degenerate.astype(np.float32)
  return np.clip(d + np.float32(factor) * (image.astype(np.float32) - d), 0, 255).astype(np.uint8)


def np_solarize_reference(image, threshold):
  # The reference compares a uint8 image with the threshold as uint8: the threshold wraps modulo 256.
  t = np.array(threshold, np.int64).astype(np.uint8)
  return np.where(image < t, image, 255 - image)


def np_contrast_reference(image, factor):
  # Its "mean" is sum(256-bin grey histogram) / 256 = H*W/256, then clipped and cast to uint8.
  h, w = image.shape[:2]
  grey = np.full(image.shape, np.float32(h * w) / 256).clip(0, 255).astype(np.uint8)
  return np_blend(grey, image, factor)


def np_sharpness(image, factor, rounding):
  """PIL's SMOOTH kernel on the interior in integers; `rounding` rounds, else truncates (the reference)."""
  x, (h, w) = image.astype(np.int64), image.shape[:2]
  total = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] * (5 if dy == dx == 0 else 1)
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  degenerate = image.copy()
  degenerate[1:-1, 1:-1] = (total + 6) // 13 if rounding else total // 13
  return np_blend(degenerate, image, factor)


@pytest.mark.parametrize('threshold', [0, 77, 128, 200, 255, 256, 300, 384, 512])
def test_solarize_both_modes(threshold):
  np.testing.assert_array_equal(run(ra.solarize, threshold, 'reference'), np_solarize_reference(IMAGE, threshold))
  pil = np.asarray(ImageOps.solarize(Image.fromarray(IMAGE), threshold))
  np.testing.assert_array_equal(run(ra.solarize, threshold, 'pil'), pil)
  np.testing.assert_array_equal(run(ra.solarize, threshold), run(ra.solarize, threshold, 'reference'))   # default


def test_solarize_reference_wraps_at_256_and_384():
  np.testing.assert_array_equal(run(ra.solarize, 256, 'reference'), 255 - IMAGE)   # threshold 0: full invert
  np.testing.assert_array_equal(run(ra.solarize, 384, 'reference'), np.where(IMAGE < 128, IMAGE, 255 - IMAGE))
  np.testing.assert_array_equal(run(ra.solarize, 256, 'pil'), IMAGE)               # PIL: nothing >= 256
  np.testing.assert_array_equal(run(ra.solarize, 384, 'pil'), IMAGE)


@pytest.mark.parametrize('shape', [(24, 24), (40, 32), (17, 300), (272, 256)])   # grey 2, 5, 19, 255 (clipped)
@pytest.mark.parametrize('factor', [0.1, 0.55, 1.0, 1.9, 2.8])
def test_contrast_reference_blends_towards_pixel_count_over_256(shape, factor):
  image = np.random.RandomState(shape[0]).randint(0, 256, shape + (3,)).astype(np.uint8)
  got = ra.contrast(tf.constant(image), factor, 'reference').numpy()
  np.testing.assert_array_equal(got, np_contrast_reference(image, factor))
  np.testing.assert_array_equal(ra.contrast(tf.constant(image), factor).numpy(), got)   # the default
  if factor == 0.1 and shape == (272, 256):   # 0.1 of the way from white
    assert got.min() >= 229


@pytest.mark.parametrize('factor', [0.1, 0.3, 1.6, 1.9, 2.8])
@pytest.mark.parametrize('name,pil_cls', [('contrast', ImageEnhance.Contrast), ('sharpness', ImageEnhance.Sharpness)])
def test_pil_mode_contrast_and_sharpness_match_pil_exactly(name, pil_cls, factor):
  for image in (IMAGE, np.random.RandomState(3).randint(0, 256, (19, 33, 3)).astype(np.uint8)):
    expected = np.asarray(pil_cls(Image.fromarray(image)).enhance(factor))
    np.testing.assert_array_equal(getattr(ra, name)(tf.constant(image), factor, 'pil').numpy(), expected)


@pytest.mark.parametrize('factor', [0.0, 0.1, 0.55, 1.9, 2.8])
def test_sharpness_both_modes_match_numpy(factor):
  image = np.random.RandomState(4).randint(0, 256, (21, 18, 3)).astype(np.uint8)
  for mode, rounding in (('reference', False), ('pil', True)):
    got = ra.sharpness(tf.constant(image), factor, mode).numpy()
    np.testing.assert_array_equal(got, np_sharpness(image, factor, rounding), mode)
  np.testing.assert_array_equal(ra.sharpness(tf.constant(image), factor).numpy(),
                                np_sharpness(image, factor, rounding=False))   # the default


def test_sharpness_reference_truncates_the_smoothing():
  spot = np.full((5, 5, 3), 100, np.uint8)
  spot[2, 2] = 112   # centre smoothed: (8 * 100 + 5 * 112) / 13 = 104.6
  assert ra.sharpness(tf.constant(spot), 0.0, 'reference').numpy()[2, 2, 0] == 104
  assert ra.sharpness(tf.constant(spot), 0.0, 'pil').numpy()[2, 2, 0] == 105
  for v in range(256):   # a flat image smooths to itself exactly (no float32 kernel landing a hair below v)
    flat = np.full((4, 4, 3), v, np.uint8)
    np.testing.assert_array_equal(ra.sharpness(tf.constant(flat), 0.0, 'reference').numpy(), flat)


def test_rotate_90_is_rot90_and_zero_is_identity():
  square = IMAGE[:23, :23]   # odd size: the centre is a pixel, so 90 degrees is exact
  rotated = ra.rotate(tf.constant(square), 90.).numpy()
  np.testing.assert_array_equal(rotated, np.rot90(square, k=1))   # counter-clockwise
  np.testing.assert_array_equal(run(ra.rotate, 0.), IMAGE)


def test_translate_and_shear_shift_content_and_fill_128():
  out = run(ra.translate_x, 5.)
  np.testing.assert_array_equal(out[:, 5:], IMAGE[:, :-5])
  assert (out[:, :5] == ra.FILL).all()
  out = run(ra.translate_y, -3.)
  np.testing.assert_array_equal(out[:-3], IMAGE[3:])
  assert (out[-3:] == ra.FILL).all()
  out = run(ra.shear_x, 0.5)   # row y samples x + 0.5 y: row 0 unchanged, row 10 shifted left by 5
  np.testing.assert_array_equal(out[0], IMAGE[0])
  np.testing.assert_array_equal(out[10, :-5], IMAGE[10, 5:])


def test_cutout_fills_one_square():
  out = ra.cutout(tf.constant(IMAGE), 4, KEY).numpy()
  changed = (out != IMAGE).any(-1)
  ys, xs = np.nonzero((out == ra.FILL).all(-1) & changed)
  assert ys.max() - ys.min() < 8 and xs.max() - xs.min() < 8 and changed.sum() > 0
  np.testing.assert_array_equal(out[~(out == ra.FILL).all(-1)], IMAGE[~(out == ra.FILL).all(-1)])


# The paper's magnitudes (F0: 5, F1-F2: 10, F3-F7: 15; 4 layers) through the reference's level mappings
# (level = magnitude / 10): rotate 30 deg, shear 0.3, translate 100 px, cutout 40 px, SolarizeAdd 110,
# Posterize int(4 level) bits kept, Solarize threshold int(256 level), enhance factors 1.8 level + 0.1.
@pytest.mark.parametrize('magnitude,rotate,shear,translate,cutout,add,bits,threshold,enhance', [
    (5, 15., .15, 50., 20, 55, 2, 128, 1.0),
    (10, 30., .3, 100., 40, 110, 4, 256, 1.9),
    (15, 45., .45, 150., 60, 165, 6, 384, 2.8)])
def test_level_table_at_the_papers_magnitudes(magnitude, rotate, shear, translate, cutout, add, bits, threshold,
                                              enhance):
  expected = {'Rotate': rotate, 'ShearX': shear, 'ShearY': shear, 'TranslateX': translate, 'TranslateY': translate,
              'Cutout': cutout, 'SolarizeAdd': add, 'Posterize': bits, 'Solarize': threshold,
              'Color': enhance, 'Contrast': enhance, 'Brightness': enhance, 'Sharpness': enhance}
  table = ra.levels(magnitude)
  assert table == pytest.approx(expected)
  assert all(type(table[k]) is int for k in ('Cutout', 'SolarizeAdd', 'Posterize', 'Solarize'))
  x = tf.constant(IMAGE)
  for mode in MODES:
    ops = dict(ra.ops(magnitude, mode))
    assert len(ops) == 16 and set(table) <= set(ops)
    np.testing.assert_array_equal(ops['Posterize'](x, KEY).numpy(), IMAGE & (0xFF << (8 - bits) & 0xFF))
    np.testing.assert_array_equal(ops['SolarizeAdd'](x, KEY).numpy(), run(ra.solarize_add, add))
    # Solarize: the reference wraps (5: at 128, 10: every pixel inverted, 15: at 128 again); PIL stops at 255.
    effective = threshold % 256 if mode == 'reference' else threshold
    np.testing.assert_array_equal(ops['Solarize'](x, KEY).numpy(), np.where(IMAGE < effective, IMAGE, 255 - IMAGE))
    np.testing.assert_array_equal(ops['Contrast'](x, KEY).numpy(), run(ra.contrast, enhance, mode))
    np.testing.assert_array_equal(ops['Sharpness'](x, KEY).numpy(), run(ra.sharpness, enhance, mode))
    if magnitude == 5:   # enhance factor 1.0: the identity
      for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        np.testing.assert_array_equal(ops[name](x, KEY).numpy(), IMAGE, name)
  assert ra.levels(magnitude) == ra.levels(float(magnitude))


def test_randaugment_is_deterministic_per_key_and_changes_the_image():
  x = tf.constant(IMAGE)
  a = ra.randaugment(x, KEY, 2, 10).numpy()
  np.testing.assert_array_equal(a, ra.randaugment(x, KEY, 2, 10).numpy())
  outs = [ra.randaugment(x, tf.constant([7, i], tf.int64), 2, 10).numpy() for i in range(8)]
  assert sum((o != IMAGE).any() for o in outs) >= 6
  assert all(o.dtype == np.uint8 and o.shape == IMAGE.shape for o in outs)
  np.testing.assert_array_equal(ra.randaugment(x, KEY, 0, 10).numpy(), IMAGE)
  with pytest.raises(ValueError, match='num_layers'):
    ra.randaugment(x, KEY, -1, 10)


def test_ra_ops_default_and_unknown_value():
  x = tf.constant(IMAGE)
  keys = [tf.constant([5, i], tf.int64) for i in range(16)]
  default, pil = ([ra.randaugment(x, k, 1, 10, *mode).numpy() for k in keys] for mode in ((), ('pil',)))
  np.testing.assert_array_equal(default, [ra.randaugment(x, k, 1, 10, 'reference').numpy() for k in keys])
  differ = [(a != b).any() for a, b in zip(default, pil)]
  assert 0 < sum(differ) < len(keys)   # only where Solarize / Contrast / Sharpness was drawn
  with pytest.raises(ValueError, match=r"^Unknown RandAugment ra_ops 'PIL'; accepted: 'reference', 'pil'$"):
    ra.randaugment(x, KEY, 2, 10, 'PIL')
  for fn in (ra.solarize, ra.contrast, ra.sharpness):
    with pytest.raises(ValueError, match='ra_ops'):
      fn(x, 1, 'exact')
