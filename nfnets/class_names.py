"""Class names in label order, for the tools that show or export predictions (predict, export, the
augmentation preview): from a file the user gives, else the run's dataset, else ImageNet's for a 1000-class
model, else None (classes shown as indices).

A dataset's names: digits '0'..'9'; an image folder its class folders (sorted, the labels' order:
`nfnets.data.sources.folder_layout`); a TFDS dataset its label feature's names; imagenet2012 the ILSVRC-2012
names shipped in `imagenet_classes.txt` (`synset<TAB>name` per line, in the standard index order).
"""
import os
from typing import List, Optional

from absl import logging

IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')


def read_class_names(path: Optional[str], num_classes: int) -> Optional[List[str]]:
  """Names for `num_classes` labels from `path` (one per line in label order; a `synset<TAB>name` line
  gives the name), or the shipped ImageNet list when `path` is None and there are 1000 classes; else None.

  Raises FileNotFoundError when `path` cannot be read, ValueError when it lists another number of names.
  """
  if path is None:
    if num_classes != 1000:
      return None
    path = IMAGENET_CLASSES
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\r\n') for line in f]
  except OSError as e:
    raise FileNotFoundError(f'--classes: cannot read {path}: {e.strerror or e}') from None
  while lines and not lines[-1].strip():
    lines.pop()
  names = [line.split('\t', 1)[-1].strip() for line in lines]
  if len(names) != num_classes:
    raise ValueError(f'{path} has {len(names)} class names but the model has {num_classes} classes')
  return names


def dataset_class_names(dataset) -> Optional[List[str]]:
  """The names of a config's `dataset` block (see the module docstring); None when it has none ('fake')
  or they cannot be read (a warning says why)."""
  name = dataset.get('name')
  try:
    if name == 'digits':
      return [str(i) for i in range(10)]
    if name == 'imagenet2012':
      return read_class_names(None, 1000)
    if name == 'folder':
      from nfnets.data import sources  # pylint: disable=g-import-not-at-top
      return list(sources.folder_layout(dataset['data_dir'], dataset['train_split'], dataset['eval_split'])[0])
    if name and name != 'fake':
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy, TFDS data only)
      return list(tfds.builder(name, data_dir=dataset.get('data_dir')).info.features['label'].names)
  except Exception as e:  # pylint: disable=broad-except
    text = ' '.join(str(e).split()) or type(e).__name__
    logging.warning('Class names of dataset %r unavailable (%s); classes are shown as indices', name, text)
  return None


def class_names(num_classes: int, classes_file: Optional[str] = None, dataset=None) -> Optional[List[str]]:
  """Names in label order: `classes_file`, else the dataset's (a run's `config.dataset`), else ImageNet's
  for 1000 classes; None when unknown or when the dataset's count differs from `num_classes`."""
  if classes_file:
    return read_class_names(classes_file, num_classes)
  names = dataset_class_names(dataset) if dataset is not None else read_class_names(None, num_classes)
  return names if names is not None and len(names) == num_classes else None
