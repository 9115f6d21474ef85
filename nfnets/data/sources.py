"""Where examples come from: digits (in memory), TFDS (ImageNet and others), an image folder.

A `Source` hands out per-process shards as tf.data datasets of {'image', 'label'}; `image` is either a decoded
uint8 [H, W, 3] tensor or encoded bytes (`Source.encoded`), so the train path can crop JPEGs before decoding.
'fake' data never reaches this module: the pipeline makes it directly, with no decoding cost.
"""
import concurrent.futures
import dataclasses
import os
from typing import Callable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

NAMES = ('digits', 'fake', 'folder', 'imagenet2012', '<any TFDS image classification dataset>')
DIGITS_NUM_TEST = 360            # of scikit-learn's 1797 digits; the other 1437 train
DIGITS_SPLIT_SEED = 0
IMAGENET_HOLDOUT = 10_000        # the reference code: the first 10k train images are the holdout
FOLDER_EVAL_EVERY = 10           # flat folder layout: file i of a class (sorted) is eval when i % 10 == 0
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')

# (process_index, process_count) -> (that process's dataset, files dropped as unreadable while listing it)
ShardFn = Callable[[int, int], Tuple[tf.data.Dataset, int]]


@dataclasses.dataclass(frozen=True)
class Source:
  num_classes: int
  num_train: int                  # for 'folder', files listed; unreadable ones are dropped (and counted) later
  num_eval: int
  encoded: bool                   # 'image' holds encoded bytes rather than decoded uint8 pixels
  train: ShardFn
  eval: ShardFn
  eval_shard_sizes: Callable[[int], List[int]]   # process_count -> examples in each process's eval shard


def shard_range(n: int, index: int, count: int) -> Tuple[int, int]:
  """[start, end) of process `index`'s part of n examples, as np.array_split (as the reference code shards)."""
  start = index * (n // count) + min(index, n % count)
  return start, start + n // count + (index < n % count)


def _array_shard_sizes(n: int) -> Callable[[int], List[int]]:
  return lambda count: [shard_range(n, i, count)[1] - shard_range(n, i, count)[0] for i in range(count)]


def get_source(ds_config) -> Source:
  name = ds_config.name
  if name == 'digits':
    return digits_source(ds_config.train_split, ds_config.eval_split)
  if name == 'folder':
    return folder_source(ds_config.data_dir, ds_config.train_split, ds_config.eval_split)
  if name == 'fake':
    raise ValueError("'fake' data has no Source; the pipeline generates it")
  return tfds_source(name, ds_config.data_dir, ds_config.train_split, ds_config.eval_split)


# ---------------------------------------------------------------------------------------------------- digits

def digits_arrays() -> dict:
  """{'train'/'test': (uint8 [N, 8, 8, 3], int32 [N])}: a fixed seeded split of scikit-learn's digits."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Values are 0..16; scale to the 0..255 range the ImageNet normalisation expects.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = order[:DIGITS_NUM_TEST], order[DIGITS_NUM_TEST:]
  return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}


def _array_shards(images: np.ndarray, labels: np.ndarray) -> ShardFn:
  def shard(index, count):
    start, end = shard_range(len(labels), index, count)
    return tf.data.Dataset.from_tensor_slices({'image': images[start:end], 'label': labels[start:end]}), 0
  return shard


def digits_source(train_split: str, eval_split: str) -> Source:
  arrays = digits_arrays()
  for split in (train_split, eval_split):
    if split not in arrays:
      raise ValueError(f'Unknown digits split {split!r}; accepted: {sorted(arrays)}')
  (train_x, train_y), (eval_x, eval_y) = arrays[train_split], arrays[eval_split]
  return Source(10, len(train_y), len(eval_y), False, _array_shards(train_x, train_y),
                _array_shards(eval_x, eval_y), _array_shard_sizes(len(eval_y)))


# ---------------------------------------------------------------------------------------------------- TFDS

def _imagenet_missing_error(builder, data_dir) -> FileNotFoundError:
  where = data_dir or tfds.core.constants.DATA_DIR
  return FileNotFoundError(
      f'ImageNet (imagenet2012) is not prepared in data_dir={where!r}. TFDS cannot download it: put '
      f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {os.path.join(where, "downloads", "manual")}/ '
      f'and run once:\n  tfds build imagenet2012 --data_dir={where}\n'
      f'(or python -c "import tensorflow_datasets as tfds; tfds.builder(\'imagenet2012\', '
      f'data_dir=\'{where}\').download_and_prepare()"). Then set config.dataset.data_dir={where!r}.')


def _tfds_split(name: str, split: str) -> str:
  if name == 'imagenet2012':
    # The reference's 10k holdout (the reference code's dataset.py) under readable names.
    return {'train_holdout': f'train[{IMAGENET_HOLDOUT}:]', 'holdout': f'train[:{IMAGENET_HOLDOUT}]'}.get(
        split, split)
  return split


def tfds_source(name: str, data_dir: Optional[str], train_split: str, eval_split: str) -> Source:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset name {name!r}; accepted: {", ".join(NAMES)}') from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'TFDS dataset {name!r} has features {sorted(features)}; need "image" and "label"')

  def open_split(split, read_config=None, shuffle_files=False):
    try:
      ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                              shuffle_files=shuffle_files, read_config=read_config)
    except AssertionError as e:   # TFDS signals "no prepared data" with an AssertionError
      if name == 'imagenet2012':
        raise _imagenet_missing_error(builder, data_dir) from e
      raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}: run '
                              f'`tfds build {name} --data_dir=<dir>` where the data can be fetched') from e
    return ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})

  def num_examples(split):
    try:
      return builder.info.splits[split].num_examples
    except (KeyError, ValueError):
      # Unprepared metadata (mock data in tests): count by reading, which also raises the clear error above.
      return int(open_split(split).reduce(0, lambda n, _: n + 1))

  train, evals = _tfds_split(name, train_split), _tfds_split(name, eval_split)

  def shard(split, shuffle):
    def fn(index, count):
      part = tfds.even_splits(split, n=count)[index]
      # Per-process file order is seeded so a run is reproducible; shuffle_files reorders files only.
      return open_split(part, tfds.ReadConfig(shuffle_seed=index, try_autocache=False), shuffle), 0
    return fn

  num_eval = num_examples(evals)
  # tfds.even_splits divides as np.array_split does, so shard sizes follow from the total.
  return Source(features['label'].num_classes, num_examples(train), num_eval, True,
                shard(train, True), shard(evals, False), _array_shard_sizes(num_eval))


# ---------------------------------------------------------------------------------------------------- folder

def _list_images(directory: str) -> List[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def _readable(path: str) -> bool:
  try:
    with Image.open(path) as im:   # reads the header only; full corruption is caught at decode time
      return im.format is not None
  except Exception:  # pylint: disable=broad-except
    return False


def _drop_unreadable(files: Sequence[Tuple[str, int]]) -> Tuple[List[Tuple[str, int]], int]:
  with concurrent.futures.ThreadPoolExecutor(16) as pool:   # I/O bound: threads hide file latency
    ok = list(pool.map(_readable, [f for f, _ in files]))
  bad = [f for (f, _), good in zip(files, ok) if not good]
  for f in bad[:20]:
    logging.warning('Skipping unreadable image %s', f)
  if bad:
    logging.warning('Skipped %d unreadable images (of %d)', len(bad), len(files))
  return [f for f, good in zip(files, ok) if good], len(bad)


def folder_layout(root: str, train_split: str, eval_split: str):
  """(class names, train [(path, label)], eval [(path, label)]).

  Two layouts: `root/<train_split>/<class>/*` with `root/<eval_split>/<class>/*` (eval_split 'validation' also
  finds 'val'), or a flat `root/<class>/*` where file i (sorted) of each class goes to eval when i % 10 == 0.
  Classes are the sorted subfolder names of the train folder; an empty class keeps its index (so labels
  do not shift when a class is emptied) and is reported with a warning.
  """
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"config.dataset.data_dir={root!r} is not a folder; 'folder' data needs "
                            '<data_dir>/<class>/*.jpg (or <data_dir>/train/<class>/* and <data_dir>/val/<class>/*)')
  eval_names = [eval_split] + (['val'] if eval_split == 'validation' else [])
  eval_dirs = [os.path.join(root, n) for n in eval_names if os.path.isdir(os.path.join(root, n))]
  split_layout = os.path.isdir(os.path.join(root, train_split)) and eval_dirs
  train_root = os.path.join(root, train_split) if split_layout else root
  classes = sorted(d for d in os.listdir(train_root) if os.path.isdir(os.path.join(train_root, d)))
  if not classes:
    raise FileNotFoundError(f'No class subfolders in {train_root!r}')
  train, evals = [], []
  for label, c in enumerate(classes):
    files = _list_images(os.path.join(train_root, c))
    if not files:
      logging.warning('Class folder %r has no images (accepted extensions %s); its label %d stays reserved',
                      os.path.join(train_root, c), IMAGE_EXTENSIONS, label)
    if split_layout:
      train += [(f, label) for f in files]
      eval_class = os.path.join(eval_dirs[0], c)
      evals += [(f, label) for f in (_list_images(eval_class) if os.path.isdir(eval_class) else [])]
    else:
      for i, f in enumerate(files):
        (evals if i % FOLDER_EVAL_EVERY == 0 else train).append((f, label))
  return classes, train, evals


def _file_shards(files: Sequence[Tuple[str, int]]) -> ShardFn:
  def shard(index, count):
    start, end = shard_range(len(files), index, count)
    part, num_invalid = _drop_unreadable(files[start:end])
    paths = [f for f, _ in part] or ['']
    ds = tf.data.Dataset.from_tensor_slices({'path': paths, 'label': np.array([l for _, l in part] or [0],
                                                                             np.int32)})
    ds = ds.take(len(part))
    return ds.map(lambda ex: {'image': tf.io.read_file(ex['path']), 'label': ex['label']}), num_invalid
  return shard


def folder_source(root: str, train_split: str, eval_split: str) -> Source:
  classes, train, evals = folder_layout(root, train_split, eval_split)
  if not train:
    raise FileNotFoundError(f'No training images under {root!r} (extensions {IMAGE_EXTENSIONS})')
  return Source(len(classes), len(train), len(evals), True, _file_shards(train), _file_shards(evals),
                _array_shard_sizes(len(evals)))
