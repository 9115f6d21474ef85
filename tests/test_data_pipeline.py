"""The input-pipeline contract: uint8 train batches per device, unnormalised eval, sizes per model, sharded
eval, seeds, errors. The batch-level augmentation is tested in test_device_augment."""
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import base
from nfnets import data, registry
from nfnets.data import preprocess, sources


def ds_config(name='digits', **augment):
  c = base.get_config('F0').dataset
  c.name = name
  if name == 'digits':
    c.train_split, c.eval_split = 'train', 'test'
  c.shuffle_buffer = 100
  c.augment.update(augment)
  return c


def train_batch(config, *, batch=8, size=32, devices=2, seed=0, classes=10, **kw):
  it = data.train_iterator(config, global_batch_size=batch, image_size=size, num_classes=classes, seed=seed,
                           num_local_devices=devices, **kw)
  return next(it)


def test_digits_info_and_fixed_split():
  assert data.dataset_info(ds_config()) == data.DatasetInfo(10, 1437, 360)
  a, b = sources.digits_arrays(), sources.digits_arrays()
  np.testing.assert_array_equal(a['test'][1], b['test'][1])
  assert a['train'][0].shape == (1437, 8, 8, 3) and a['train'][0].dtype == np.uint8
  assert a['train'][0].max() == 255 and sorted(set(a['test'][1])) == list(range(10))


@pytest.mark.parametrize('model', ['F0', 'F1'])
def test_train_and_eval_sizes_per_model(model):
  spec = registry.get_spec(model)
  b = train_batch(ds_config(), size=spec.train_size)   # the F0 recipe: its mixing happens on the device
  assert set(b) == {'images', 'labels'}
  assert b['images'].shape == (2, 4, spec.train_size, spec.train_size, 3) and b['images'].dtype == np.uint8
  assert b['labels'].shape == (2, 4) and b['labels'].dtype == np.int32
  assert 0 <= b['labels'].min() and b['labels'].max() < 10 and b['images'].max() > 128
  e = next(data.eval_iterator(ds_config(), global_batch_size=4, image_size=spec.test_size, num_local_devices=2))
  assert e['images'].shape == (2, 2, spec.test_size, spec.test_size, 3) and e['labels'].dtype == np.int32
  assert e['images'].dtype == np.float32 and e['images'].max() > 128   # pixels, not normalised
  assert e['mask'].shape == (2, 2) and e['mask'].dtype == np.float32


def test_train_images_are_the_rounded_crops():
  """One decoded example per train image, sent as uint8: the bicubic resize clipped and rounded."""
  config = ds_config(random_crop=False, random_flip=False)
  config.shuffle_buffer = 1   # the split's order
  b = train_batch(config, batch=4, size=20, devices=1)
  images, labels = sources.digits_arrays()['train']
  key = tf.constant([0, 0], tf.int64)   # unused without random crops and flips
  for i in range(4):
    crop = preprocess.train_image(tf.constant(images[i]), key, encoded=False, image_size=20, random_crop=False,
                                  crop_area_min=0.08, random_flip=False).numpy()
    assert crop.min() < 0 or crop.max() > 255 or i   # bicubic overshoots (checked on the first image)
    np.testing.assert_array_equal(b['images'][0, i], np.round(np.clip(crop, 0, 255)).astype(np.uint8))
  np.testing.assert_array_equal(b['labels'][0], labels[:4])


def test_eval_preprocessing_is_square_resize_then_centre_crop():
  image = tf.constant(np.random.RandomState(0).randint(0, 256, (50, 80, 3)), tf.uint8)
  out = preprocess.eval_image(image, encoded=False, image_size=20, resize_pad=7).numpy()
  full = tf.image.resize(image, [27, 27], method='bicubic').numpy()
  np.testing.assert_allclose(out, full[4:24, 4:24])   # offset (7 + 1) // 2 = 4


def test_train_crop_window_is_inside_image_with_inception_ranges():
  for i in range(20):
    y, x, h, w = preprocess.random_crop_window(tf.constant([300, 400, 3]), tf.constant([0, i], tf.int64),
                                               224, 0.08).numpy()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    assert h * w >= 0.08 * 300 * 400 * 0.99 or (h, w) == (int(224 / 256 * 300),) * 2


def test_seed_fixes_the_stream():
  a, b = train_batch(ds_config(), seed=1), train_batch(ds_config(), seed=1)
  c = train_batch(ds_config(), seed=2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['images'], c['images'])
  d = train_batch(ds_config(), seed=1, process_index=1, process_count=2)
  assert not np.array_equal(a['images'][:, :2], d['images'][:, :2])   # processes see different data


def eval_pass(config, count, index, batch=24, devices=2, size=16):
  return list(data.eval_iterator(config, global_batch_size=batch, image_size=size, num_local_devices=devices,
                                 process_index=index, process_count=count))


@pytest.mark.parametrize('count', [2, 7])   # 360 / 7 leaves shards of 51 and 52 examples
def test_eval_covers_every_example_once_with_equal_batch_counts(count):
  config = ds_config()
  reference = eval_pass(config, 1, 0, batch=24 * count)
  real = lambda batches, key: np.concatenate([b[key][b['mask'] > 0] for b in batches])
  passes = [eval_pass(config, count, i, batch=24 * count) for i in range(count)]
  assert len({len(p) for p in passes}) == 1
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(np.concatenate([real(p, key) for p in passes]), real(reference, key))
  assert sum(p_b['mask'].sum() for p in passes for p_b in p) == 360
  assert all(((b['mask'] == 0) <= (b['labels'] == 0)).all() for p in passes for b in p)


def test_fake_data():
  info = data.dataset_info(ds_config('fake'))
  assert info.num_classes == 1000 and info.num_train_examples == 1_281_167
  b = train_batch(ds_config('fake'), batch=8, size=24, classes=1000)
  assert set(b) == {'images', 'labels'}
  assert b['images'].shape == (2, 4, 24, 24, 3) and b['images'].dtype == np.uint8
  assert b['labels'].shape == (2, 4) and b['labels'].dtype == np.int32 and b['labels'].max() < 1000
  batches = eval_pass(ds_config('fake'), 3, 2, batch=48)
  assert batches[0]['images'].dtype == np.float32 and 0 <= batches[0]['images'].min()
  assert len(batches) == 21 and sum(b['mask'].sum() for b in batches) == 333


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="'nope'.*accepted.*digits"):
    data.dataset_info(ds_config('nope'))
  with pytest.raises(ValueError, match=r'batch_size=10 must be divisible by processes \(1\) x local devices \(4\)'):
    train_batch(ds_config(), batch=10, devices=4)
  with pytest.raises(ValueError, match='10 classes but the model has 5'):
    train_batch(ds_config(), classes=5)
  with pytest.raises(ValueError, match="digits split 'validation'"):
    config = ds_config()
    config.eval_split = 'validation'
    data.dataset_info(config)
  with pytest.raises(ValueError, match='process_index=2'):
    train_batch(ds_config(), process_index=2, process_count=2)


@pytest.mark.parametrize('name,classes,eval_split', [('imagenet2012', 1000, 'validation'),
                                                     ('cifar10', 10, 'test')])   # JPEG and PNG records
def test_tfds_through_mock_data(name, classes, eval_split):
  config = ds_config(name)
  config.data_dir, config.eval_split = '/nonexistent/tfds', eval_split
  with tfds.testing.mock_data(num_examples=12):
    info = data.dataset_info(config)
    assert info == data.DatasetInfo(classes, 12, 12)
    b = train_batch(config, batch=4, size=40, classes=classes)
    assert b['images'].shape == (2, 2, 40, 40, 3) and b['images'].dtype == np.uint8
    assert b['labels'].shape == (2, 2) and ((0 <= b['labels']) & (b['labels'] < classes)).all()
    batches = eval_pass(config, 1, 0, batch=8, size=24)
    assert len(batches) == 2 and sum(x['mask'].sum() for x in batches) == 12
    assert np.isfinite(batches[0]['images']).all() and batches[0]['images'].std() > 0.1


def test_imagenet_missing_gives_instructions(tmp_path):
  config = ds_config('imagenet2012')
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'ILSVRC2012_img_train.tar.*downloads/manual'):
    data.dataset_info(config)


def test_shards_and_holdout_follow_the_reference():
  for n, count in [(10, 3), (50_000, 8), (5, 7)]:
    expected = [(int(a[0]), int(a[-1]) + 1) if len(a) else None for a in np.array_split(np.arange(n), count)]
    got = [sources.shard_range(n, i, count) for i in range(count)]
    assert [g if g[0] < g[1] else None for g in got] == expected
  assert sources._tfds_split('imagenet2012', 'holdout') == 'train[:10000]'
  assert sources._tfds_split('imagenet2012', 'train_holdout') == 'train[10000:]'
  assert sources._tfds_split('imagenet2012', 'validation') == 'validation'
