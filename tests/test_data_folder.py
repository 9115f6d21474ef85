"""The 'folder' source on generated files: layouts, odd image modes, corrupt files, an empty class."""
import io

import numpy as np
from PIL import Image
import pytest

from configs import base
from nfnets import data
from nfnets.data import pipeline, sources


def save(path, array, mode=None, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path, fmt)


def jpeg_bytes(seed):
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(seed).randint(0, 256, (45, 60, 3), np.uint8)).save(buf, 'JPEG')
  return buf.getvalue()


@pytest.fixture
def flat_folder(tmp_path):
  for i in range(11):
    (tmp_path / 'ant' / f'{i:02d}.jpg').parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'ant' / f'{i:02d}.jpg').write_bytes(jpeg_bytes(i))
  (tmp_path / 'ant' / 'x_corrupt.jpg').write_bytes(b'this is not an image')
  (tmp_path / 'ant' / 'x_truncated.jpg').write_bytes(jpeg_bytes(99)[:1500])   # header fine, data cut off
  for i in range(4):
    save(tmp_path / 'bee' / f'{i}.png', np.full((30, 20), 40 * i, np.uint8), 'L')
  (tmp_path / 'cat').mkdir()          # empty class
  (tmp_path / 'bee' / 'notes.txt').write_text('ignored: not an image extension')
  return tmp_path


def config(root, **kw):
  c = base.get_config('nf_resnet50').dataset
  c.name, c.data_dir = 'folder', str(root)
  c.update(kw)
  return c


def test_flat_layout_holds_out_a_fraction_and_empty_class_keeps_its_label(flat_folder):
  classes, train, evals, flat = sources.folder_layout(str(flat_folder), 'train', 'validation')
  assert classes == ['ant', 'bee', 'cat'] and flat
  assert sorted(p.split('/')[-1] for p, _ in evals) == ['0.png', '00.jpg', '10.jpg']   # files 0 and 10
  assert len(train) == 9 + 2 + 3   # the two bad files are listed; they fail (and are counted) when decoded
  assert data.dataset_info(config(flat_folder)) == data.DatasetInfo(3, 14, 3)
  assert sources.describe(config(flat_folder), sources.get_source(config(flat_folder))) == (
      "Dataset folder: 14 train examples ('train'), 3 eval examples ('validation'), 3 classes; flat folder: "
      "the eval split is dataset.folder_eval_fraction=0.1 of each class's files")
  # ceil(n x fraction) of each class's n files: ant has 13 (with the two bad ones), bee 4.
  assert data.dataset_info(config(flat_folder, folder_eval_fraction=0.5)) == data.DatasetInfo(3, 17 - 9, 9)
  assert data.dataset_info(config(flat_folder, folder_eval_fraction=0.0)) == data.DatasetInfo(3, 17, 0)
  assert [i for i in range(31) if sources.held_out(i, 0.1)] == [0, 10, 20, 30]   # exact: 0.1 x 30 is 3
  with pytest.raises(ValueError, match=r'folder_eval_fraction=1.0 must be in \[0, 1\)'):
    sources.folder_layout(str(flat_folder), 'train', 'validation', 1.0)


def test_undecodable_files_are_replaced_counted_and_named(flat_folder, caplog):
  """A slot whose example fails to decode takes the next position's example that decodes: full batches,
  each failure counted (in every epoch it is met) and the file named in a warning."""
  c = config(flat_folder)
  it = data.train_iterator(c, global_batch_size=7, image_size=24, num_classes=3, seed=0)
  batches = [next(it) for _ in range(8)]   # 56 positions: 4 epochs of the 14 listed train files
  split = sources.get_source(c).train
  bad = {i for i in range(len(split)) if split.paths[i].startswith('ant/x_')}
  order = pipeline.train_order(len(split), 0)
  expected = 0
  for g in range(56):          # each slot tries positions g, g + 1, ... until one decodes
    while int(order[g]) in bad:
      expected, g = expected + 1, g + 1
  assert len(bad) == 2 and expected >= 8 and it.num_skipped == expected
  labels = np.concatenate([b['labels'] for b in batches])
  assert set(labels) == {0, 1}             # the empty class 2 never appears
  assert all(b['images'].shape == (7, 24, 24, 3) and b['images'].dtype == np.uint8 for b in batches)
  assert any(r.message.startswith('Skipping undecodable image') and r.message.endswith(
      'x_truncated.jpg: jpeg::Uncompress failed. Invalid JPEG data or crop window.') for r in caplog.records), [
          r.message for r in caplog.records]
  assert any('undecodable images skipped so far' in r.message for r in caplog.records)
  # A batch with a bad file is redone one example at a time; the other process's slice of the same global
  # batch is decoded whole: the two ways give the same pixels.
  halves = [data.train_iterator(c, global_batch_size=8, image_size=24, num_classes=3, seed=0, process_index=i,
                                process_count=2) for i in range(2)]
  whole = data.train_iterator(c, global_batch_size=8, image_size=24, num_classes=3, seed=0)
  for _ in range(4):
    parts, want = [next(h) for h in halves], next(whole)
    np.testing.assert_array_equal(np.concatenate([p['images'] for p in parts]), want['images'])
  assert halves[0].num_skipped + halves[1].num_skipped == whole.num_skipped > 0


def test_undecodable_eval_images_become_padding(flat_folder):
  c = config(flat_folder, folder_eval_fraction=0.5)   # eval: ant files 0, 2, .., 12 (x_truncated), bee 0, 2
  batches = list(data.eval_iterator(c, global_batch_size=4, image_size=8))
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 9 - 1
  evals = sources.get_source(c).eval
  masks = np.concatenate([b['mask'] for b in batches])[:len(evals)]
  assert [evals.paths[i] for i in np.flatnonzero(masks == 0)] == ['ant/x_truncated.jpg']


def test_split_layout_and_image_modes_become_rgb(tmp_path):
  save(tmp_path / 'train' / 'a' / '1.png', np.full((10, 10, 3), 7, np.uint8))
  save(tmp_path / 'train' / 'b' / '1.png', np.full((10, 10, 3), 9, np.uint8))
  save(tmp_path / 'val' / 'a' / 'gray.png', np.full((30, 50), 100, np.uint8), 'L')
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[...] = (200, 10, 30, 128)
  save(tmp_path / 'val' / 'b' / 'rgba.png', rgba, 'RGBA')
  save(tmp_path / 'val' / 'b' / 'rgb.jpg', np.full((33, 47, 3), (0, 250, 0), np.uint8))
  c = config(tmp_path)
  assert data.dataset_info(c) == data.DatasetInfo(2, 2, 3)
  (batch,) = data.eval_iterator(c, global_batch_size=4, image_size=8)
  pixels = batch['images']   # eval pixels are not normalised on the host
  np.testing.assert_allclose(pixels[0], 100, atol=0.1)                 # grayscale -> RGB
  np.testing.assert_allclose(pixels[1], np.broadcast_to((0, 250, 0), (8, 8, 3)), atol=4)  # JPEG is lossy
  np.testing.assert_allclose(pixels[2], np.broadcast_to((200, 10, 30), (8, 8, 3)), atol=0.1)  # alpha dropped
  np.testing.assert_array_equal(batch['labels'], [0, 1, 1, 0])
  np.testing.assert_array_equal(batch['mask'], [1, 1, 1, 0])


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_dir=.*is not a folder'):
    data.dataset_info(config(tmp_path / 'nope'))
