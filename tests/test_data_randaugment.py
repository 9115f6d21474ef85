"""RandAugment ops against NumPy / PIL references on fixed images, and the op table's level mappings."""
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
                                                 ('color', ImageEnhance.Color, 0.3),
                                                 ('contrast', ImageEnhance.Contrast, 1.9),
                                                 ('sharpness', ImageEnhance.Sharpness, 1.9)])
def test_enhance_ops_match_pil(name, pil_cls, factor):
  expected = np.asarray(pil_cls(Image.fromarray(IMAGE)).enhance(factor)).astype(int)
  got = run(getattr(ra, name), factor).astype(int)
  assert np.abs(got - expected).max() <= 2, name   # PIL rounds where TF truncates


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


def test_level_mappings_follow_the_reference():
  # Magnitude 10 = level 1: rotate 30 deg, posterize 4 bits, solarize at 256 (no-op), enhance 1.9.
  ops = dict(ra.ops(10))
  np.testing.assert_array_equal(ops['Posterize'](tf.constant(IMAGE), KEY).numpy(), IMAGE & 0xF0)
  np.testing.assert_array_equal(ops['Solarize'](tf.constant(IMAGE), KEY).numpy(), IMAGE)
  ops5 = dict(ra.ops(5))   # enhance factor 5/10 * 1.8 + 0.1 = 1.0: the identity
  np.testing.assert_array_equal(ops5['Contrast'](tf.constant(IMAGE), KEY).numpy(), IMAGE)
  assert len(ops) == 16


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
