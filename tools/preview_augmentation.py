"""Writes a PNG grid of augmented training images, titled with their (mixed) targets by class name.

  python -m tools.preview_augmentation --workdir=runs/demo          # writes runs/demo/augmentation.png
  python -m tools.preview_augmentation --config=configs/f0.py --config.dataset.data_dir=DIR --out=grid.png

Shows what the model sees: a host batch (decode, crop, flip, resize) through the train step's device
augmentation (`nfnets.data.device_augment.augment_batch`: MixUp/CutMix, RandAugment, normalisation) with the
run's settings, un-normalised for display. A run's workdir supplies its saved config (overrides on top);
titles use the dataset's class names (`nfnets.class_names`: an image folder's class folders), else indices.
Without --out the grid goes to `<workdir>/augmentation.png`, else `runs/augmentation.png`.
"""
import os
from typing import Optional, Sequence

from absl import flags
from absl import logging
import numpy as np

from configs import base
from nfnets import config_validation
from nfnets import console
from nfnets import run_config



def define_flags():
  """Flags exist only when run as a script, so tests can import this module next to other absl programs."""
  global _CONFIG, _WORKDIR, _OUT, _NUM, _SEED
  _CONFIG = run_config.define_config_flag(base.get_config, "Training config: a recipe .py or a run's "
                                          "config.json; default: --workdir's saved config.")
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A run whose saved config to preview.')
  _OUT = flags.DEFINE_string('out', None, 'PNG file to write; default: <workdir>/augmentation.png, else '
                             'runs/augmentation.png.')
  _NUM = flags.DEFINE_integer('num', 16, 'Images to show (rounded up to an even number: MixUp/CutMix pair '
                              'them).')
  _SEED = flags.DEFINE_integer('seed', 0, 'Data and augmentation seed.')


def title(target: np.ndarray, names: Optional[Sequence[str]] = None) -> str:
  """The (up to two) classes of a soft target with their weights: 'cat:0.70 + dog:0.30'."""
  top = np.argsort(-target)[:2]
  label = lambda c: names[c] if names else str(c)
  return ' + '.join(f'{label(c)}:{target[c]:.2f}' for c in top if target[c] > 0.005)


def default_out(workdir: Optional[str]) -> str:
  return os.path.join(workdir, 'augmentation.png') if workdir else os.path.join('runs', 'augmentation.png')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  from nfnets import class_names, data  # pylint: disable=g-import-not-at-top
  from nfnets.data import device_augment, normalize  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  num = max(2, _NUM.value + _NUM.value % 2)
  xp = experiment.Experiment(config, devices=jax.local_devices()[:1])  # validates the config
  logging.info('%s', run_config.describe())
  names = class_names.class_names(config.model.num_classes, dataset=config.dataset)
  batch = next(data.train_iterator(config.dataset, global_batch_size=num, seed=_SEED.value, process_index=0,
                                   process_count=1, **xp.train_input()))
  augment = jax.jit(lambda x, y, k: device_augment.augment_batch(x, y, k, **xp.train_augment()))
  images, targets, _ = augment(batch['images'], batch['labels'], jax.random.PRNGKey(_SEED.value))
  pixels = np.asarray(images) * np.float32(normalize.STDDEV_RGB) + np.float32(normalize.MEAN_RGB)
  pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  cols = int(np.ceil(np.sqrt(num)))
  rows = int(np.ceil(num / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, image, target in zip(axes.ravel(), pixels, np.asarray(targets)):
    ax.imshow(image)
    ax.set_title(title(target, names), fontsize=8)
  fig.suptitle(f'{config.dataset.name} train batch after the device augmentation (class:weight)', fontsize=10)
  fig.tight_layout()
  out = _OUT.value or default_out(_WORKDIR.value)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  print(f'Wrote {num} images to {out}')
  return 0


def parse_flags(argv):
  return run_config.parse_flags(argv, base.get_config)


def cli():
  """The `nfnets-preview-augmentation` command (pyproject.toml); `python -m tools.preview_augmentation`."""
  define_flags()
  console.run(main, (config_validation.ConfigError,), flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
