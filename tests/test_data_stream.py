"""The train stream is a pure function of (seed, step): the same global batch for 1, 2 or 4 processes, a
resume that starts at its step at once, every example once per epoch in a fresh order."""
import time

import numpy as np
from PIL import Image
import pytest

from configs import base
from nfnets import data
from nfnets.data import sources

NUM_FILES = 12   # 3 classes x 4 solid-colour images: a pixel value names its file


@pytest.fixture(scope='module')
def colour_folder(tmp_path_factory):
  """File k of the folder is a solid image of value 10 + 20 k: any crop, flip or resize of it keeps it."""
  root = tmp_path_factory.mktemp('colours')
  for k in range(NUM_FILES):
    (root / f'class_{k // 4}').mkdir(exist_ok=True)
    Image.fromarray(np.full((20 + k, 30, 3), 10 + 20 * k, np.uint8)).save(root / f'class_{k // 4}' / f'{k:02d}.png')
  return str(root)


def folder_config(root):
  c = base.get_config('F0').dataset
  c.name, c.data_dir, c.folder_eval_fraction = 'folder', root, 0.0
  c.num_threads = 2
  return c


def digits_config():
  c = base.use_digits(base.get_config('F0')).dataset
  c.augment.random_flip = True   # every host augmentation on: its keys must not depend on the layout
  return c


def first_batch(config, start_step, index=0, count=1, batch=8, seed=3):
  it = data.train_iterator(config, global_batch_size=batch, image_size=16, num_classes=10, seed=seed,
                           start_step=start_step, process_index=index, process_count=count)
  batch = next(it)
  it.close()   # stops its prefetching threads
  return batch


@pytest.mark.parametrize('source', ['folder', 'digits'])
def test_global_batch_is_the_same_for_1_2_4_processes(source, colour_folder):
  config = folder_config(colour_folder) if source == 'folder' else digits_config()
  for step in (0, 7, 1000):
    whole = first_batch(config, step)
    for count in (2, 4):
      slices = [first_batch(config, step, i, count) for i in range(count)]
      for key in ('images', 'labels'):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), whole[key],
                                      err_msg=f'{source} step {step}, {count} processes, {key}')
    assert len({b.tobytes() for b in whole['images']}) > 1   # not one image repeated


def test_resume_yields_the_uninterrupted_batches_at_once(colour_folder, monkeypatch):
  config = folder_config(colour_folder)
  config.augment.random_crop = False   # solid images: let the crop not hide a wrong position
  uninterrupted = data.train_iterator(config, global_batch_size=4, image_size=16, num_classes=10, seed=3)
  expected = [next(uninterrupted) for _ in range(9)][5:]
  resumed = data.train_iterator(config, global_batch_size=4, image_size=16, num_classes=10, seed=3,
                                start_step=5)
  for step, want in enumerate(expected, start=5):
    got = next(resumed)
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'step {step} {key}')

  reads = []
  read = sources.FileSplit.__getitem__
  monkeypatch.setattr(sources.FileSplit, '__getitem__', lambda self, i: reads.append(i) or read(self, i))
  times = {}
  for step in (0, 10**7):
    reads.clear()
    start = time.perf_counter()
    first_batch(config, step, batch=4)
    times[step] = time.perf_counter() - start
    # The batch and the few that 2 threads prefetch beside it, whatever the step (a replay would read
    # 4 x 10^7 files).
    assert 4 <= len(reads) <= 4 * 10, (step, len(reads))
  assert times[10**7] < 3 * times[0] + 0.5, times


def test_two_epochs_see_every_example_once_in_different_orders(colour_folder):
  config = folder_config(colour_folder)
  it = data.train_iterator(config, global_batch_size=4, image_size=16, num_classes=10, seed=3)
  values = [b['images'][:, 0, 0, 0] for b in (next(it) for _ in range(2 * NUM_FILES // 4))]
  files = (np.concatenate(values).astype(int) - 10) // 20
  first, second = files[:NUM_FILES], files[NUM_FILES:]
  assert sorted(first) == sorted(second) == list(range(NUM_FILES))
  assert list(first) != list(second)
  assert list(first) != list(range(NUM_FILES))   # shuffled, not the listing's order


def test_worker_processes_decode_the_same_batches(colour_folder):
  """Grain's worker processes (each with its own copy of the decoder) give the threads' batches."""
  config = folder_config(colour_folder)
  threads = data.train_iterator(config, global_batch_size=4, image_size=16, num_classes=10, seed=3,
                                start_step=2)
  config.num_workers, config.num_threads = 1, None
  workers = data.train_iterator(config, global_batch_size=4, image_size=16, num_classes=10, seed=3,
                                start_step=2)
  try:
    for _ in range(2):
      a, b = next(threads), next(workers)
      np.testing.assert_array_equal(a['images'], b['images'])
      np.testing.assert_array_equal(a['labels'], b['labels'])
  finally:
    workers.close()
