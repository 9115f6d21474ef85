"""The 'folder' source on generated files: layouts, odd image modes, corrupt files, an empty class."""
import io

import numpy as np
from PIL import Image
import pytest

from configs import base
from nfnets import data
from nfnets.data import sources


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
  c.name, c.data_dir, c.shuffle_buffer = 'folder', str(root), 50
  c.update(kw)
  return c


def test_flat_layout_every_tenth_file_is_eval_and_empty_class_keeps_its_label(flat_folder):
  classes, train, evals = sources.folder_layout(str(flat_folder), 'train', 'validation')
  assert classes == ['ant', 'bee', 'cat']
  assert sorted(p.split('/')[-1] for p, _ in evals) == ['0.png', '00.jpg', '10.jpg']
  assert len(train) == 9 + 2 + 3   # the two bad files are listed; they are dropped later
  assert data.dataset_info(config(flat_folder)) == data.DatasetInfo(3, 14, 3)


def test_corrupt_files_are_skipped_and_counted(flat_folder):
  it = data.train_iterator(config(flat_folder), global_batch_size=8, image_size=24, num_classes=3, seed=0,
                           num_local_devices=1)
  batches = [next(it) for _ in range(12)]   # 96 examples (one per image): several epochs of the 13 files
  assert not sources._readable(str(flat_folder / 'ant' / 'x_corrupt.jpg'))   # dropped when listing
  assert sources._readable(str(flat_folder / 'ant' / 'x_truncated.jpg'))     # fails only when decoded
  # 96 examples = 8 epochs of the 12 decodable files; every epoch also fails once on the truncated file
  # (the 8th epoch's failure counts if it came before the last example consumed).
  assert 1 + 7 <= it.num_skipped <= 1 + 8
  labels = np.concatenate([b['labels'].ravel() for b in batches])
  assert set(labels) == {0, 1}             # the empty class 2 never appears
  assert all(b['images'].shape == (1, 8, 24, 24, 3) and b['images'].dtype == np.uint8 for b in batches)


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
  (batch,) = data.eval_iterator(c, global_batch_size=4, image_size=8, num_local_devices=1)
  pixels = batch['images'][0]   # eval pixels are not normalised on the host
  np.testing.assert_allclose(pixels[0], 100, atol=0.1)                 # grayscale -> RGB
  np.testing.assert_allclose(pixels[1], np.broadcast_to((0, 250, 0), (8, 8, 3)), atol=4)  # JPEG is lossy
  np.testing.assert_allclose(pixels[2], np.broadcast_to((200, 10, 30), (8, 8, 3)), atol=0.1)  # alpha dropped
  np.testing.assert_array_equal(batch['labels'][0], [0, 1, 1, 0])
  np.testing.assert_array_equal(batch['mask'][0], [1, 1, 1, 0])


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='data_dir=.*is not a folder'):
    data.dataset_info(config(tmp_path / 'nope'))
