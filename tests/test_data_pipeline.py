"""The input-pipeline contract: uint8 train batches per process, unnormalised eval, sizes per model, the eval
layout over processes, seeds, errors, TFDS in ArrayRecord format. The stream's (seed, step) properties are
tested in test_data_stream; the batch-level augmentation in test_device_augment."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import base
from nfnets import data, registry
from nfnets.data import pipeline, preprocess, sources


def ds_config(name='digits', **augment):
  c = base.get_config('F0').dataset
  c.name = name
  if name == 'digits':
    c.train_split, c.eval_split = 'train', 'test'
  c.augment.update(augment)
  return c


def train_batch(config, *, batch=8, size=32, seed=0, classes=10, **kw):
  it = data.train_iterator(config, global_batch_size=batch, image_size=size, num_classes=classes, seed=seed,
                           **kw)
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
  assert b['images'].shape == (8, spec.train_size, spec.train_size, 3) and b['images'].dtype == np.uint8
  assert b['labels'].shape == (8,) and b['labels'].dtype == np.int32
  assert 0 <= b['labels'].min() and b['labels'].max() < 10 and b['images'].max() > 128
  e = next(data.eval_iterator(ds_config(), global_batch_size=4, image_size=spec.test_size))
  assert e['images'].shape == (4, spec.test_size, spec.test_size, 3) and e['labels'].dtype == np.int32
  assert e['images'].dtype == np.float32 and e['images'].max() > 128   # pixels, not normalised
  assert e['mask'].shape == (4,) and e['mask'].dtype == np.float32


def test_train_images_are_the_rounded_crops_keyed_by_seed_and_position():
  """One decoded example per train image, sent as uint8: the bicubic resize clipped and rounded; slot j of
  step s holds the example at position g = s * B + j of the seed's order, cropped and flipped with the key
  (seed, g)."""
  seed, batch, step = 3, 4, 5
  b = train_batch(ds_config(), batch=batch, size=20, seed=seed, start_step=step)
  images, labels = sources.digits_arrays()['train']
  order = pipeline.train_order(len(labels), seed)
  for j in range(batch):
    g = step * batch + j
    crop = preprocess.train_image(tf.constant(images[order[g]]), tf.constant([seed, g], tf.int64), encoded=False,
                                  image_size=20, random_crop=True, crop_area_min=0.08, random_flip=True).numpy()
    # Bicubic upsampling of the 8 px glyphs overshoots 0..255 on every image, so clipping is exercised.
    assert crop.min() < 0 or crop.max() > 255, j
    np.testing.assert_array_equal(b['images'][j], np.round(np.clip(crop, 0, 255)).astype(np.uint8))
    assert b['labels'][j] == labels[order[g]]


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


def test_seed_fixes_the_stream_and_processes_read_their_slice():
  a, b = train_batch(ds_config(), seed=1), train_batch(ds_config(), seed=1)
  c = train_batch(ds_config(), seed=2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['images'], c['images'])
  d = train_batch(ds_config(), seed=1, process_index=1, process_count=2)   # slots 4..7 of the global batch
  np.testing.assert_array_equal(d['images'], a['images'][4:])
  np.testing.assert_array_equal(d['labels'], a['labels'][4:])


def eval_pass(config, count, index, batch=24, size=16):
  return list(data.eval_iterator(config, global_batch_size=batch, image_size=size, process_index=index,
                                 process_count=count))


@pytest.mark.parametrize('count', [2, 7])   # 360 / (24 * 7) leaves a last global batch of 24 examples
def test_eval_global_batches_are_the_same_for_any_process_count(count):
  """Each process's eval batches are contiguous slices of the same global batches as one process reads;
  the padding (mask 0, label 0) is the same; every process has as many batches; 360 examples in all."""
  config = ds_config()
  reference = eval_pass(config, 1, 0, batch=24 * count)
  passes = [eval_pass(config, count, i, batch=24 * count) for i in range(count)]
  assert len({len(p) for p in passes}) == 1 and len(passes[0]) == len(reference) == -(-360 // (24 * count))
  for k, whole in enumerate(reference):
    for key in ('images', 'labels', 'mask'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in passes]), whole[key])
  assert sum(b['mask'].sum() for b in reference) == 360
  assert all(((b['mask'] == 0) <= (b['labels'] == 0)).all() for b in reference)
  images, labels = sources.digits_arrays()['test']
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in reference])[:360], labels)
  first = preprocess.eval_image(tf.constant(images[0]), encoded=False, image_size=16, resize_pad=None).numpy()
  np.testing.assert_array_equal(reference[0]['images'][0], first)   # float crops, not rounded


def test_the_train_split_read_as_eval_is_in_order_and_unaugmented():
  """split='train' (what the linear probe reads): every train example once, in the split's order, with
  the eval crop; the last batch padded with mask 0."""
  batches = list(data.eval_iterator(ds_config(), global_batch_size=500, image_size=16, split='train'))
  images, labels = sources.digits_arrays()['train']
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == len(labels) == 1437
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches])[:1437], labels)
  last = preprocess.eval_image(tf.constant(images[-1]), encoded=False, image_size=16, resize_pad=None).numpy()
  np.testing.assert_array_equal(batches[-1]['images'][1436 - 1000], last)
  with pytest.raises(ValueError, match="split='test'"):
    data.eval_iterator(ds_config(), global_batch_size=8, image_size=16, split='test')


def test_eval_resize_pad_keeps_the_reference_crop_ratio_unless_set():
  assert [preprocess.eval_resize_pad(s) for s in (32, 64, 224, 256, 320)] == [4, 8, 28, 32, 32]
  assert preprocess.eval_resize_pad(32, 0) == 0 and preprocess.eval_resize_pad(32, 32) == 32
  config = ds_config()
  config.eval_resize_pad = None
  (batch,) = eval_pass(config, 1, 0, batch=360, size=16)
  image = sources.digits_arrays()['test'][0][0]
  crop = preprocess.eval_image(tf.constant(image), encoded=False, image_size=16, resize_pad=2).numpy()
  np.testing.assert_array_equal(batch['images'][0], crop)   # 16 px: pad round(16 * 32 / 256) = 2


def test_fake_data():
  info = data.dataset_info(ds_config('fake'))
  assert info.num_classes == 1000 and info.num_train_examples == 1_281_167
  b = train_batch(ds_config('fake'), batch=8, size=24, classes=1000)
  assert set(b) == {'images', 'labels'}
  assert b['images'].shape == (8, 24, 24, 3) and b['images'].dtype == np.uint8
  assert b['labels'].shape == (8,) and b['labels'].dtype == np.int32 and b['labels'].max() < 1000
  half = train_batch(ds_config('fake'), batch=8, size=24, classes=1000, process_index=1, process_count=2)
  np.testing.assert_array_equal(half['images'], b['images'][4:])   # the same global batch
  np.testing.assert_array_equal(half['labels'], b['labels'][4:])
  batches = eval_pass(ds_config('fake'), 3, 2, batch=48)
  assert batches[0]['images'].dtype == np.float32 and 0 <= batches[0]['images'].min()
  # 1000 examples in 21 global batches of 48; process 2 holds slots 32..47: 16 x 20 + 8 real examples.
  assert len(batches) == 21 and sum(b['mask'].sum() for b in batches) == 328


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="'nope'.*accepted.*digits"):
    data.dataset_info(ds_config('nope'))
  with pytest.raises(ValueError, match=r'global_batch_size=10 must be divisible by processes \(4\)'):
    train_batch(ds_config(), batch=10, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='start_step=-1'):
    train_batch(ds_config(), start_step=-1)
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
    assert b['images'].shape == (4, 40, 40, 3) and b['images'].dtype == np.uint8
    assert b['labels'].shape == (4,) and ((0 <= b['labels']) & (b['labels'] < classes)).all()
    batches = eval_pass(config, 1, 0, batch=8, size=24)
    assert len(batches) == 2 and sum(x['mask'].sum() for x in batches) == 12
    assert np.isfinite(batches[0]['images']).all() and batches[0]['images'].std() > 0.1


def test_imagenet_missing_gives_instructions(tmp_path):
  config = ds_config('imagenet2012')
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r'ILSVRC2012_img_train.tar.*downloads/manual'):
    data.dataset_info(config)


def test_imagenet_holdout_follows_the_reference():
  assert sources._tfds_split('imagenet2012', 'holdout') == 'train[:10000]'
  assert sources._tfds_split('imagenet2012', 'train_holdout') == 'train[10000:]'
  assert sources._tfds_split('imagenet2012', 'validation') == 'validation'


@pytest.fixture(scope='module')
def dummy_mnist(tmp_path_factory):
  """tfds.testing.DummyMnist (20 train and 20 test PNG digits), prepared as ArrayRecord and as TFRecord."""
  dirs = {}
  for file_format in ('array_record', 'tfrecord'):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    tfds.testing.DummyMnist(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
  return dirs


def test_tfds_array_record_is_read_by_position(dummy_mnist):
  config = ds_config('dummy_mnist', random_crop=False, random_flip=False)
  config.data_dir, config.eval_split = dummy_mnist['array_record'], 'test'
  assert data.dataset_info(config) == data.DatasetInfo(10, 20, 20)
  b = train_batch(config, batch=4, size=16, start_step=6)   # positions 24..27: the second epoch
  records = tfds.data_source('dummy_mnist', split='train', data_dir=config.data_dir, download=False)
  order = pipeline.train_order(20, 0)
  for j in range(4):
    record = records[int(order[24 + j])]
    pixels = np.repeat(record['image'], 3, axis=-1)   # TFDS's own decoding of the grayscale PNG
    crop = preprocess.train_image(tf.constant(pixels), tf.constant([0, 24 + j], tf.int64), encoded=False,
                                  image_size=16, random_crop=False, crop_area_min=0.08, random_flip=False)
    np.testing.assert_array_equal(b['images'][j], np.round(np.clip(crop.numpy(), 0, 255)).astype(np.uint8))
    assert b['labels'][j] == record['label']


def test_tfrecord_only_dataset_names_the_converter(dummy_mnist):
  config = ds_config('dummy_mnist')
  config.data_dir, config.eval_split = dummy_mnist['tfrecord'], 'test'
  with pytest.raises(ValueError, match=r"'dummy_mnist' in .* is prepared as tfrecord only, which has no random "
                                       r'access: convert it in place with `tfds convert_format '
                                       r'--dataset_version_dir=.*/dummy_mnist/3\.0\.1 '
                                       r'--out_file_format=array_record`.*file_format=.array_record.') as e:
    data.dataset_info(config)
  assert '\n' not in str(e.value)
