"""Writes a PNG grid of augmented training images, titled with their (mixed) targets.

  python -m tools.preview_augmentation --config=configs/demo.py --out=grid.png

Shows what the model sees: a host batch (decode, crop, flip, resize) through the train step's device
augmentation (`nfnets.data.device_augment.augment_batch`: MixUp/CutMix, RandAugment, normalisation) with the
run's settings, un-normalised for display.
"""
from absl import app, flags
import jax
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags
import numpy as np

import experiment
from nfnets import data
from nfnets.data import device_augment, normalize

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=False)
_OUT = flags.DEFINE_string('out', 'grid.png', 'PNG file to write.')
_NUM = flags.DEFINE_integer('num', 16, 'Images to show (rounded up to an even number: MixUp/CutMix pair them).')
_SEED = flags.DEFINE_integer('seed', 0, 'Data and augmentation seed.')


def title(target: np.ndarray) -> str:
  top = np.argsort(-target)[:2]
  return ' + '.join(f'{c}:{target[c]:.2f}' for c in top if target[c] > 0.005)


def main(_):
  config = _CONFIG.value
  num = max(2, _NUM.value + _NUM.value % 2)
  xp = experiment.Experiment(config, devices=jax.local_devices()[:1])
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
    ax.set_title(title(target), fontsize=8)
  fig.suptitle(f'{config.dataset.name} train batch after the device augmentation (class:weight)', fontsize=10)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=100)
  print(f'Wrote {num} images to {_OUT.value}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
