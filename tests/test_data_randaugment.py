"""RandAugment's JAX ops against NumPy / PIL references on fixed images, the op table's level mappings, and
the batched `randaugment`: its draws (per image, uniform over the 16 ops) and that it applies them.

Solarize, Contrast and Sharpness are checked in both `ra_ops` modes: 'reference' (the NFNet reference code's
behaviour, the default) against NumPy re-implementations, 'pil' against PIL itself."""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from nfnets.data import randaugment as ra

RNG = np.random.RandomState(0)
# A natural-ish image: smooth gradients plus noise, not using the full 0..255 range (AutoContrast has work).
_yy, _xx = np.mgrid[0:24, 0:24]
IMAGE = np.clip(np.stack([_yy * 5 + 40, _xx * 4 + 60, (_yy + _xx) * 3 + 20], -1) + RNG.randint(0, 20, (24, 24, 3)),
                0, 255).astype(np.uint8)
KEY = jax.random.key(1)
MODES = ('reference', 'pil')
NAMES = [name for name, _ in ra.ops(10)]
# Jitted once per static setting, shared by the tests below (threefry and the layer compile slowly).
randaugment = jax.jit(ra.randaugment, static_argnums=(2, 3, 4))
draws = jax.jit(ra._draws, static_argnums=(1, 2))
op_indices = jax.jit(ra.op_indices, static_argnums=(1, 2))


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  return jax.jit(fn, static_argnums=static)


def run(fn, *args, image=IMAGE):
  """fn(image, *args), jitted once per op and mode: numbers are traced, except rotate's angle (exact only
  as a Python number, see randaugment._cos_sin)."""
  static = tuple(i + 1 for i, a in enumerate(args) if isinstance(a, str) or fn is ra.rotate)
  return np.asarray(_jitted(fn, static)(image, *args))


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
  for image in (np.random.RandomState(5).randint(0, 256, (31, 17, 3)).astype(np.uint8),   # every bin used
                np.random.RandomState(6).randint(90, 97, (20, 20, 3)).astype(np.uint8),   # 7 bins
                np.full((8, 8, 3), 200, np.uint8)):                                       # one bin: unchanged
    np.testing.assert_array_equal(run(ra.equalize, image=image), np.asarray(ImageOps.equalize(Image.fromarray(image))))


@pytest.mark.parametrize('name,pil_cls,factor', [('brightness', ImageEnhance.Brightness, 1.6),
                                                 ('color', ImageEnhance.Color, 0.3)])
def test_brightness_and_color_match_pil(name, pil_cls, factor):
  expected = np.asarray(pil_cls(Image.fromarray(IMAGE)).enhance(factor)).astype(int)
  got = run(getattr(ra, name), factor).astype(int)
  assert np.abs(got - expected).max() <= 1, name   # Color: TF's grey weights differ from PIL's by a hair


# --- Solarize, Contrast, Sharpness in both modes -----------------------------------------------------------

def np_blend(degenerate, image, factor):
  """The reference's blend: in float32 (each operation rounded), clipped, truncated to uint8."""
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
def test_contrast_reference_blends_towards_pixel_count_over_256(shape):
  image = np.random.RandomState(shape[0]).randint(0, 256, shape + (3,)).astype(np.uint8)
  for factor in (0.1, 0.55, 1.0, 1.9, 2.8):
    got = run(ra.contrast, factor, 'reference', image=image)
    np.testing.assert_array_equal(got, np_contrast_reference(image, factor))
    np.testing.assert_array_equal(run(ra.contrast, factor, image=image), got)   # the default
    if factor == 0.1 and shape == (272, 256):   # 0.1 of the way from white
      assert got.min() >= 229


@pytest.mark.parametrize('name,pil_cls', [('contrast', ImageEnhance.Contrast), ('sharpness', ImageEnhance.Sharpness)])
def test_pil_mode_contrast_and_sharpness_match_pil_exactly(name, pil_cls):
  for factor in (0.1, 0.3, 1.6, 1.9, 2.8):
    for image in (IMAGE, np.random.RandomState(3).randint(0, 256, (19, 33, 3)).astype(np.uint8)):
      expected = np.asarray(pil_cls(Image.fromarray(image)).enhance(factor))
      np.testing.assert_array_equal(run(getattr(ra, name), factor, 'pil', image=image), expected, f'{name} {factor}')


def test_sharpness_both_modes_match_numpy():
  image = np.random.RandomState(4).randint(0, 256, (21, 18, 3)).astype(np.uint8)
  for factor in (0.0, 0.1, 0.55, 1.9, 2.8):
    for mode, rounding in (('reference', False), ('pil', True)):
      got = run(ra.sharpness, factor, mode, image=image)
      np.testing.assert_array_equal(got, np_sharpness(image, factor, rounding), f'{mode} {factor}')
    np.testing.assert_array_equal(run(ra.sharpness, factor, image=image),
                                  np_sharpness(image, factor, rounding=False))   # the default


def test_sharpness_reference_truncates_the_smoothing():
  spot = np.full((5, 5, 3), 100, np.uint8)
  spot[2, 2] = 112   # centre smoothed: (8 * 100 + 5 * 112) / 13 = 104.6
  assert run(ra.sharpness, 0.0, 'reference', image=spot)[2, 2, 0] == 104
  assert run(ra.sharpness, 0.0, 'pil', image=spot)[2, 2, 0] == 105
  # A flat image smooths to itself exactly (no float32 kernel landing a hair below v), for every v.
  flats = np.repeat(np.arange(256, dtype=np.uint8), 4 * 4 * 3).reshape(256, 4, 4, 3)
  np.testing.assert_array_equal(jax.vmap(lambda x: ra.sharpness(x, 0.0, 'reference'))(flats), flats)


def test_blend_rounds_the_product_as_float32_numpy_does():
  # Every (degenerate, image) pair: a product fused into the add (an FMA) would differ from NumPy for some.
  d, x = (a.astype(np.uint8) for a in np.meshgrid(np.arange(256), np.arange(256), indexing='ij'))
  for factor in (0.1, 0.3, 0.55, 1.45, 1.6, 1.9, 2.35, 2.8):
    np.testing.assert_array_equal(jax.jit(ra.blend)(d, x, factor), np_blend(d, x, factor), str(factor))


def test_rotate_90_is_rot90_and_zero_is_identity():
  square = IMAGE[:23, :23]   # odd size: the centre is a pixel, so 90 degrees is exact
  np.testing.assert_array_equal(run(ra.rotate, 90., image=square), np.rot90(square, k=1))   # counter-clockwise
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


def test_nearest_sampling_rounds_half_away_from_zero_then_fills_outside():
  # TF's kernel: std::round, then FILL where the rounded column is outside. Input column = x - shift.
  row = np.arange(10, 18, dtype=np.uint8)[None, :, None].repeat(3, -1)
  for shift, expected in [(0.3, [10, 11, 12, 13, 14, 15, 16, 17]), (-0.3, [10, 11, 12, 13, 14, 15, 16, 17]),
                          (0.5, [128, 11, 12, 13, 14, 15, 16, 17]), (-0.5, [11, 12, 13, 14, 15, 16, 17, 128]),
                          (2.5, [128, 128, 128, 11, 12, 13, 14, 15]), (-1.5, [12, 13, 14, 15, 16, 17, 128, 128])]:
    np.testing.assert_array_equal(run(ra.translate_x, shift, image=row)[0, :, 0], expected, str(shift))


def test_cutout_fills_one_square():
  out = run(ra.cutout, 4, KEY)
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
  x = jnp.asarray(IMAGE)
  for mode in MODES:
    ops = dict(ra.ops(magnitude, mode))
    assert len(ops) == 16 and set(table) <= set(ops)
    np.testing.assert_array_equal(ops['Posterize'](x, KEY), IMAGE & (0xFF << (8 - bits) & 0xFF))
    np.testing.assert_array_equal(ops['SolarizeAdd'](x, KEY), run(ra.solarize_add, add))
    # Solarize: the reference wraps (5: at 128, 10: every pixel inverted, 15: at 128 again); PIL stops at 255.
    effective = threshold % 256 if mode == 'reference' else threshold
    np.testing.assert_array_equal(ops['Solarize'](x, KEY), np.where(IMAGE < effective, IMAGE, 255 - IMAGE))
    np.testing.assert_array_equal(ops['Contrast'](x, KEY), run(ra.contrast, enhance, mode))
    np.testing.assert_array_equal(ops['Sharpness'](x, KEY), run(ra.sharpness, enhance, mode))
    # Signed ops: one of the two signs, each for some key.
    for name, fn in (('Rotate', ra.rotate), ('ShearX', ra.shear_x), ('ShearY', ra.shear_y)):
      both = [run(fn, sign * table[name]) for sign in (1, -1)]
      seen = {next(i for i, o in enumerate(both) if (o == ops[name](x, jax.random.key(k))).all()) for k in range(8)}
      assert seen == {0, 1}, name
    if magnitude == 5:   # enhance factor 1.0: the identity
      for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        np.testing.assert_array_equal(ops[name](x, KEY), IMAGE, name)
  assert ra.levels(magnitude) == ra.levels(float(magnitude))


# --- randaugment on a batch ---------------------------------------------------------------------------------
# 64 images (every op gets drawn), in a few static settings only: each compiles once.
IMAGES = np.stack([np.roll(IMAGE, 3 * i, axis=i % 2) for i in range(64)])


def test_randaugment_is_deterministic_per_key_and_changes_the_image():
  a = np.asarray(randaugment(IMAGES, KEY, 2, 10))
  assert a.dtype == np.uint8 and a.shape == IMAGES.shape
  np.testing.assert_array_equal(a, randaugment(IMAGES, KEY, 2, 10))
  assert sum((o != x).any() for o, x in zip(a, IMAGES)) >= 56
  b = np.asarray(randaugment(IMAGES, jax.random.key(2), 2, 10))
  assert sum((o != p).any() for o, p in zip(a, b)) >= 48   # another key, other images (some ops fill all)
  np.testing.assert_array_equal(ra.randaugment(IMAGES, KEY, 0, 10), IMAGES)
  with pytest.raises(ValueError, match='num_layers'):
    ra.randaugment(IMAGES, KEY, -1, 10)


def test_randaugment_batches_under_jit_and_vmap_as_in_the_train_step():
  keys = jax.random.split(KEY, 2)   # one key and one batch per device
  per_device = jax.jit(jax.vmap(functools.partial(ra.randaugment, num_layers=2, magnitude=10)))
  out = per_device(np.stack([IMAGES, IMAGES[::-1]]), keys)
  assert out.shape == (2,) + IMAGES.shape and out.dtype == jnp.uint8
  np.testing.assert_array_equal(out[0], randaugment(IMAGES, keys[0], 2, 10))
  np.testing.assert_array_equal(out[1], randaugment(IMAGES[::-1], keys[1], 2, 10))


def test_op_draws_are_uniform_and_independent_per_image_and_layer():
  which = np.asarray(op_indices(KEY, 2000, 2))
  assert which.shape == (2000, 2) and which.min() >= 0 and which.max() <= 15
  counts = np.bincount(which.reshape(-1), minlength=16)   # 250 expected each; sd ~15
  assert counts.min() > 190 and counts.max() < 310, counts
  assert (which[:, 0] != which[:, 1]).mean() == pytest.approx(15 / 16, abs=0.03)
  # The random sign comes from the op's own key: independent of which op was drawn.
  which1, op_keys = draws(KEY, 2000, 1)
  positive = np.asarray(jax.vmap(ra._sign)(op_keys[:, 0])) > 0
  assert all(0.3 < positive[np.asarray(which1[:, 0]) == op].mean() < 0.7 for op in range(16))
  np.testing.assert_array_equal(op_indices(KEY, 64, 2), which[:64])   # image i's draws: not the batch's
  np.testing.assert_array_equal(op_indices(jax.random.key_data(KEY), 64, 2), which[:64])   # a raw PRNGKey too


def test_randaugment_applies_the_drawn_ops_to_each_image_in_order():
  which, op_keys = draws(KEY, len(IMAGES), 2)
  np.testing.assert_array_equal(which, op_indices(KEY, len(IMAGES), 2))
  assert set(np.asarray(which[:, 0])) == set(range(16))
  out = np.asarray(randaugment(IMAGES, KEY, 2, 10))
  ops = ra.ops(10)
  for i, image in enumerate(IMAGES):   # each op on its own, not jitted: the same pixels as under jit / vmap
    (first, f), (second, g) = ops[int(which[i, 0])], ops[int(which[i, 1])]
    np.testing.assert_array_equal(out[i], g(f(jnp.asarray(image), op_keys[i, 0]), op_keys[i, 1]),
                                  f'image {i}: {first}, {second}')


def test_ra_ops_default_and_unknown_value():
  default, pil = np.asarray(randaugment(IMAGES, KEY, 2, 10)), np.asarray(randaugment(IMAGES, KEY, 2, 10, 'pil'))
  assert inspect.signature(ra.randaugment).parameters['ra_ops'].default == 'reference'
  differ = (default != pil).reshape(len(IMAGES), -1).any(-1)
  mode_ops = np.isin(np.asarray(op_indices(KEY, len(IMAGES), 2)),
                     [NAMES.index(n) for n in ('Solarize', 'Contrast', 'Sharpness')]).any(-1)
  # Only where Solarize / Contrast / Sharpness was drawn; almost always then (a translation by 100 px
  # after it fills the whole image, for one).
  assert not (differ & ~mode_ops).any() and differ.sum() >= 0.8 * mode_ops.sum() >= 8, (differ.sum(), mode_ops.sum())
  with pytest.raises(ValueError, match=r"^Unknown RandAugment ra_ops 'PIL'; accepted: 'reference', 'pil'$"):
    ra.randaugment(IMAGES, KEY, 2, 10, 'PIL')
  for fn in (ra.solarize, ra.contrast, ra.sharpness):
    with pytest.raises(ValueError, match='ra_ops'):
      fn(jnp.asarray(IMAGE), 1, 'exact')
  assert ra.check_ra_ops('pil') == 'pil' and ra.RA_OPS == MODES
