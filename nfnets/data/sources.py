"""Where examples come from, with random access: digits (arrays), TFDS datasets in ArrayRecord format, an
image folder (a list of files). 'fake' data never reaches this module: the pipeline makes it directly.

A split is a sequence (`len(split)`, `split[i]`) of {'image', 'label'} records, what Grain's
`MapDataset.source` reads: `image` is either encoded bytes (`Source.encoded`, so the train path can crop
JPEGs while decoding) or decoded uint8 pixels [H, W, 3]. Random access is what lets the stream read the
examples of any step directly (nfnets/data/pipeline.py); a TFDS dataset prepared only as TFRecord has none.
"""
import dataclasses
import fractions
import functools
import os
from typing import List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

NAMES = ('digits', 'fake', 'folder', 'imagenet2012', '<any TFDS image classification dataset>')
DIGITS_NUM_TEST = 360            # of scikit-learn's 1797 digits; the other 1437 train
DIGITS_SPLIT_SEED = 0
IMAGENET_HOLDOUT = 10_000        # the reference code: the first 10k train images are the holdout
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


class _Split:
  """What every split has besides len() and [i]: `describe(i)` names record i in a warning."""
  encoded = True


class ArraySplit(_Split):
  """Records from in-memory arrays: uint8 images [N, H, W, 3] and int labels [N]."""
  encoded = False

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    self.name, self.images, self.labels = name, images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {'image': self.images[i], 'label': int(self.labels[i])}

  def describe(self, i: int) -> str:
    return f'{self.name}[{i}]'


class FileSplit(_Split):
  """Records read from image files: the encoded bytes and the class index. `paths` are relative to `root`
  (a shorter list to send to each worker process)."""

  def __init__(self, root: str, paths: Sequence[str], labels: Sequence[int]):
    self.root, self.paths, self.labels = root, list(paths), np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    with open(os.path.join(self.root, self.paths[i]), 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[i])}

  def describe(self, i: int) -> str:
    return os.path.join(self.root, self.paths[i])


class TfdsSplit(_Split):
  """Records of a TFDS data source (ArrayRecord files) with the image left encoded."""

  def __init__(self, name: str, split: str, data_source):
    self.name, self.split, self.data_source = name, split, data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, i: int) -> dict:
    ex = self.data_source[i]
    return {'image': ex['image'], 'label': int(ex['label'])}

  def describe(self, i: int) -> str:
    return f"{self.name} '{self.split}' example {i}"


@dataclasses.dataclass(frozen=True)
class Source:
  num_classes: int
  train: Sequence[dict]           # a split: len() and [i] -> {'image', 'label'}
  eval: Sequence[dict]
  encoded: bool                   # 'image' holds encoded bytes rather than decoded uint8 pixels
  note: str = ''                  # how the eval split was made, when the data did not say

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def num_eval(self) -> int:
    return len(self.eval)


def get_source(ds_config) -> Source:
  """The dataset `ds_config` names, opened once per process."""
  if ds_config.name == 'fake':
    raise ValueError("'fake' data has no Source; the pipeline generates it")
  return _open(ds_config.name, ds_config.get('data_dir'), ds_config.train_split, ds_config.eval_split,
               ds_config.get('folder_eval_fraction', 0.1))


@functools.lru_cache(maxsize=8)
def _open(name, data_dir, train_split, eval_split, folder_eval_fraction) -> Source:
  # Cached: a folder is listed (and a TFDS dataset's metadata read) once per process, not at every eval.
  if name == 'digits':
    source = digits_source(train_split, eval_split)
  elif name == 'folder':
    source = folder_source(data_dir, train_split, eval_split, folder_eval_fraction)
  else:
    source = tfds_source(name, data_dir, train_split, eval_split)
  return source


def describe(ds_config, source: Source) -> str:
  """One line of split sizes (train.py logs it when training starts: small splits are worth knowing)."""
  return (f'Dataset {ds_config.name}: {source.num_train} train examples ({ds_config.train_split!r}), '
          f'{source.num_eval} eval examples ({ds_config.eval_split!r}), {source.num_classes} classes'
          + (f'; {source.note}' if source.note else ''))


# ---------------------------------------------------------------------------------------------------- digits

def digits_arrays() -> dict:
  """{'train'/'test': (uint8 [N, 8, 8, 3], int32 [N])}: a fixed seeded split of scikit-learn's digits."""
  # scikit-learn is imported only for the digits (its import costs about a second).
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Values are 0..16; scale to the 0..255 range the ImageNet normalisation expects.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
  test, train = order[:DIGITS_NUM_TEST], order[DIGITS_NUM_TEST:]
  return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}


def digits_source(train_split: str, eval_split: str) -> Source:
  arrays = digits_arrays()
  for split in (train_split, eval_split):
    if split not in arrays:
      raise ValueError(f'Unknown digits split {split!r}; accepted: {sorted(arrays)}')
  return Source(10, ArraySplit(f'digits {train_split}', *arrays[train_split]),
                ArraySplit(f'digits {eval_split}', *arrays[eval_split]), encoded=False)


# ---------------------------------------------------------------------------------------------------- TFDS

def _prepare_command(name: str, root: str) -> str:
  return (f'python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', data_dir=\'{root}\', '
          f'file_format=\'array_record\').download_and_prepare()"')


def _imagenet_missing_error(root: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'ImageNet (imagenet2012) is not prepared in data_dir={root!r}. TFDS cannot download it: put '
      f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {os.path.join(root, "downloads", "manual")}/ '
      f'and run once:\n  {_prepare_command("imagenet2012", root)}\n'
      f'Then set config.dataset.data_dir={root!r}.')


def _tfds_split(name: str, split: str) -> str:
  if name == 'imagenet2012':
    # The reference's 10k holdout (the reference code's dataset.py) under readable names.
    return {'train_holdout': f'train[{IMAGENET_HOLDOUT}:]', 'holdout': f'train[:{IMAGENET_HOLDOUT}]'}.get(
        split, split)
  return split


def tfds_source(name: str, data_dir: Optional[str], train_split: str, eval_split: str) -> Source:
  # TFDS (and TensorFlow under it) is heavy and needed only for TFDS data.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset name {name!r}; accepted: {", ".join(NAMES)}') from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'TFDS dataset {name!r} has features {sorted(features)}; need "image" and "label"')
  root = data_dir or tfds.core.constants.DATA_DIR

  def not_prepared(error):
    if name == 'imagenet2012':
      return _imagenet_missing_error(root)
    return FileNotFoundError(f'TFDS dataset {name!r} is not prepared in data_dir={root!r}; prepare it once '
                             f'where the data can be fetched: {_prepare_command(name, root)}')

  def open_split(split):
    try:
      data_source = builder.as_data_source(split=_tfds_split(name, split),
                                           decoders={'image': tfds.decode.SkipDecoding()})
    except NotImplementedError as e:   # not prepared, or prepared in a format without random access
      if not builder.is_prepared():
        raise not_prepared(e) from e
      raise ValueError(
          f'TFDS dataset {name!r} in {builder.data_dir} is prepared as {builder.info.file_format.value} '
          'only, which has no random access: convert it in place with `tfds convert_format '
          f'--dataset_version_dir={builder.data_dir} --out_file_format=array_record` (the tfds command '
          f'needs `pip install apache-beam`), or prepare it again in ArrayRecord: {_prepare_command(name, root)}'
      ) from e
    except (AssertionError, ValueError, FileNotFoundError) as e:   # TFDS's other ways of saying it
      if builder.is_prepared():
        raise
      raise not_prepared(e) from e
    return TfdsSplit(name, split, data_source)

  return Source(features['label'].num_classes, open_split(train_split), open_split(eval_split), encoded=True)


# ---------------------------------------------------------------------------------------------------- folder

def _list_images(directory: str) -> List[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def held_out(i: int, fraction) -> bool:
  """Whether file i (sorted) of a class goes to eval in the flat layout: the files where floor(i x fraction)
  steps up, so ceil(n x fraction) of n files, spread evenly (fraction 0.1: files 0, 10, 20, ...). Exact
  rational arithmetic, so 0.1 x 30 is 3, not 3.0000000000000004."""
  f = fractions.Fraction(repr(fraction))
  return (i * f).__floor__() > ((i - 1) * f).__floor__()


def folder_layout(root: str, train_split: str, eval_split: str, eval_fraction: float = 0.1):
  """(class names, train [(path, label)], eval [(path, label)], whether the layout is flat).

  Two layouts: `root/<train_split>/<class>/*` with `root/<eval_split>/<class>/*` (eval_split 'validation' also
  finds 'val'), or a flat `root/<class>/*` where `eval_fraction` of each class's files (sorted) go to eval
  (`held_out`). Classes are the sorted subfolder names of the train folder; an empty class keeps its index
  (so labels do not shift when a class is emptied) and is reported with a warning.
  """
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"config.dataset.data_dir={root!r} is not a folder; 'folder' data needs "
                            '<data_dir>/<class>/*.jpg (or <data_dir>/train/<class>/* and <data_dir>/val/<class>/*)')
  if not 0 <= eval_fraction < 1:
    raise ValueError(f'dataset.folder_eval_fraction={eval_fraction!r} must be in [0, 1)')
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
        (evals if held_out(i, eval_fraction) else train).append((f, label))
  return classes, train, evals, not split_layout


def _file_split(root: str, files: Sequence[Tuple[str, int]]) -> FileSplit:
  return FileSplit(root, [os.path.relpath(f, root) for f, _ in files], [label for _, label in files])


def folder_source(root: str, train_split: str, eval_split: str, eval_fraction: float = 0.1) -> Source:
  classes, train, evals, flat = folder_layout(root, train_split, eval_split, eval_fraction)
  if not train:
    raise FileNotFoundError(f'No training images under {root!r} (extensions {IMAGE_EXTENSIONS})')
  note = (f'flat folder: the eval split is dataset.folder_eval_fraction={eval_fraction} of each class\'s '
          'files' if flat else '')
  return Source(len(classes), _file_split(root, train), _file_split(root, evals), encoded=True, note=note)
