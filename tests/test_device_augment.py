"""MixUp/CutMix pairs within the device batch with the reference's laws; augment_batch's order and its
no-augmentation path; small images, few compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nfnets.data import device_augment, mix, normalize, randaugment

KEY = jax.random.PRNGKey(7)


def distinct_images(n, size=8, seed=0):
  """float 0..255 images where image i differs from every other image at every pixel."""
  base = np.random.RandomState(seed).uniform(0, 20, (n, size, size, 3))
  return (base + 40 * np.arange(n)[:, None, None, None]).astype(np.float32)


@pytest.mark.parametrize('n,alpha,cutmix', [(6, 0.2, True), (5, 0.2, True), (4, 0.4, False), (3, 0.0, True)])
def test_each_output_mixes_its_image_with_the_partner(n, alpha, cutmix):
  x = distinct_images(n)
  labels = np.arange(n, dtype=np.int32)   # distinct labels: the soft target reads back each ratio
  out, soft, hard = jax.jit(lambda x, y, k: mix.mix_batch(x, y, k, num_classes=n, mixup_alpha=alpha,
                                                          use_cutmix=cutmix))(x, labels, KEY)
  out, soft, hard = np.asarray(out), np.asarray(soft), np.asarray(hard)
  np.testing.assert_array_equal(hard, labels)
  num_mixup = (n // 2 if cutmix else n) if alpha > 0 else 0   # the reference's split
  ratios = soft[np.arange(n), np.arange(n)]
  # Real blends at this key (a ratio of 0 or 1 would pass the checks below with any partner).
  for part in (ratios[:num_mixup], ratios[num_mixup:]):
    assert not part.size or ((0.01 < part) & (part < 0.99)).any(), ratios
  for i in range(n):
    p = (i + n // 2) % n
    assert p != i
    r = soft[i, i]
    np.testing.assert_allclose(soft[i, p], 1 - r, atol=1e-6)
    assert np.count_nonzero(soft[i]) <= 2 and 0 <= r <= 1
    if i < num_mixup:
      np.testing.assert_allclose(out[i], r * x[i] + (1 - r) * x[p], rtol=1e-6, atol=1e-4)
    else:   # CutMix: image i inside one axis-aligned box, the partner outside, ratio = box area
      inside = out[i] == x[i]
      np.testing.assert_array_equal(out[i][~inside], x[p][~inside])
      assert (inside == inside[..., :1]).all()
      rows, cols = inside[..., 0].any(1), inside[..., 0].any(0)
      np.testing.assert_array_equal(inside[..., 0], rows[:, None] & cols[None, :])
      for line in (rows, cols):   # one contiguous run
        assert np.count_nonzero(np.diff(np.concatenate([[0], line.astype(int), [0]]))) in (0, 2)
      assert r == pytest.approx(inside[..., 0].mean(), abs=1e-6)


def test_mixup_ratios_follow_beta():
  for alpha in (0.2, 1.0):
    x = jnp.zeros((20_000, 1, 1, 1))
    _, ratio = mix.mixup(x, x, jax.random.PRNGKey(3), alpha)
    ratio = np.asarray(ratio, np.float64)
    # Kolmogorov-Smirnov distance at the Beta's 1%..99% quantiles: float32 rounds about 2% of the draws
    # of Beta(0.2, 0.2) to exactly 1.0, which a comparison at the end points would count against the law.
    q = np.arange(1, 100) / 100
    ecdf = np.searchsorted(np.sort(ratio), stats.beta(alpha, alpha).ppf(q), side='right') / len(ratio)
    assert np.abs(ecdf - q).max() < 0.015   # the KS statistic's 1% level at n=20000: 0.0115
    assert ratio.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


def box_moments(height, width, grid=20_000):
  """E[area fraction] and E[area fraction^2] of the reference's CutMix box, in NumPy: side ratio
  sqrt(1 - U), half-sides int(side * size) // 2, centre uniform over the pixels, clipped at the borders."""
  u = (np.arange(grid) + 0.5) / grid   # midpoint rule over U
  side = np.sqrt(1 - u)

  def extent_moments(size):
    half = (side * size).astype(int) // 2
    c = np.arange(size)[None, :]
    ext = np.minimum(c + half[:, None], size) - np.maximum(c - half[:, None], 0)
    return ext.mean(1) / size, (ext.astype(float) ** 2).mean(1) / size ** 2

  (ey1, ey2), (ex1, ex2) = extent_moments(height), extent_moments(width)
  return (ey1 * ex1).mean(), (ey2 * ex2).mean()


def test_cutmix_box_law_matches_the_reference_formula():
  height, width, n = 12, 20, 20_000
  masks = np.asarray(mix.cutmix_masks(jax.random.PRNGKey(5), n, height, width))[..., 0]
  area = masks.mean((1, 2))
  m1, m2 = box_moments(height, width)
  assert m1 < 0.45   # border clipping and the even side make it less than E[1 - U] = 1/2
  sd = np.sqrt(m2 - m1 ** 2)
  assert abs(area.mean() - m1) < 4 * sd / np.sqrt(n)
  assert (area ** 2).mean() == pytest.approx(m2, rel=0.03)


def test_no_augmentation_is_one_hot_and_normalise():
  images = np.random.RandomState(0).randint(0, 256, (4, 6, 6, 3)).astype(np.uint8)
  labels = np.array([3, 0, 9, 3], np.int32)
  fn = jax.jit(lambda x, y, k: device_augment.augment_batch(x, y, k, num_classes=10))
  out, targets, hard = (np.asarray(v) for v in fn(images, labels, KEY))
  want = (images.astype(np.float32) - np.float32(normalize.MEAN_RGB)) / np.float32(normalize.STDDEV_RGB)
  np.testing.assert_allclose(out, want, rtol=2e-7, atol=0)   # at most an ulp (XLA may use the reciprocal)
  np.testing.assert_array_equal(targets, np.eye(10, dtype=np.float32)[labels])
  np.testing.assert_array_equal(hard, labels)
  assert out.dtype == np.float32 and hard.dtype == np.int32


def augment(images, labels, key, **kw):
  fn = jax.jit(lambda x, y, k: device_augment.augment_batch(x, y, k, num_classes=8, **kw))
  return [np.asarray(v) for v in fn(images, labels, key)]


def test_augmentation_is_a_function_of_the_key_and_needs_two_images():
  images = distinct_images(4).astype(np.uint8)
  labels = np.arange(4, dtype=np.int32)
  a, b = augment(images, labels, KEY, mixup_alpha=0.2, cutmix=True), augment(images, labels, KEY,
                                                                              mixup_alpha=0.2, cutmix=True)
  c = augment(images, labels, jax.random.PRNGKey(8), mixup_alpha=0.2, cutmix=True)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
  with pytest.raises(ValueError, match='at least 2 images per device, got 1'):
    augment(images[:1], labels[:1], KEY, cutmix=True)


def test_randaugment_runs_on_the_truncated_mixed_image():
  """Order of the reference (augment_before_mix=False): mix the float pixels, clip and truncate to uint8,
  RandAugment, normalise."""
  images = np.random.RandomState(1).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  labels = np.arange(4, dtype=np.int32)
  settings = dict(mixup_alpha=0.3, cutmix=True)
  out, targets, hard = augment(images, labels, KEY, ra_layers=2, ra_magnitude=9.0, **settings)
  mix_key, ra_key = jax.random.split(KEY)
  mixed, soft, _ = mix.mix_batch(images.astype(np.float32), labels, mix_key, num_classes=8,
                                 mixup_alpha=0.3, use_cutmix=True)
  pixels = np.clip(np.asarray(mixed), 0, 255).astype(np.uint8)   # truncates, as the reference's cast
  want = randaugment.randaugment(pixels, ra_key, 2, 9.0, 'reference')
  pixels_out = out * np.float32(normalize.STDDEV_RGB) + np.float32(normalize.MEAN_RGB)
  np.testing.assert_allclose(pixels_out, np.asarray(want), atol=1e-3)
  np.testing.assert_allclose(targets, soft, atol=1e-6)
  np.testing.assert_array_equal(hard, labels)
  # RandAugment changed the mixed images (else the comparison above would not test it)
  assert not np.array_equal(np.asarray(want), pixels)


def test_the_train_step_gets_the_configs_augmentation():
  """Experiment.train_augment: the config's MixUp/CutMix and ra_ops, RandAugment's layers and magnitude
  from the registry unless set (F0: 4 layers at magnitude 5, as the reference), none on fake data."""
  import experiment  # pylint: disable=g-import-not-at-top
  from test_experiment import tiny_config  # pylint: disable=g-import-not-at-top
  aug = lambda **kw: experiment.Experiment(tiny_config(**{'model.name': 'F0', **recipe, **kw}),
                                           devices=jax.local_devices()[:1]).train_augment()
  recipe = {'dataset.augment.mixup_alpha': 0.2, 'dataset.augment.cutmix': True,
            'dataset.augment.randaugment': True, 'dataset.augment.ra_ops': 'pil'}
  assert aug() == dict(num_classes=10, mixup_alpha=0.2, cutmix=True, ra_layers=4, ra_magnitude=5.0, ra_ops='pil')
  set_by_config = aug(**{'dataset.augment.ra_layers': 2, 'dataset.augment.ra_magnitude': 9})
  assert (set_by_config['ra_layers'], set_by_config['ra_magnitude']) == (2, 9.0)
  assert aug(**{'dataset.augment.randaugment': False})['ra_layers'] == 0
  assert aug(**{'dataset.name': 'fake'}) == dict(num_classes=10)
