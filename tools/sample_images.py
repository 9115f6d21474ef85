"""Writes the sample inputs the README's examples use, with nothing downloaded (`make demo` runs it).

  python -m tools.sample_images      # runs/samples/: digit_<label>.png, two photos, three_digits/

  digit_<label>.png   one image of each class 0..9 from the digits test split (the demo run never trained
                      on them), as the 8x8 pixels the digits data holds: tools.predict resizes them to the
                      run's 32 px exactly as its eval does.
  flower.jpg, china.jpg
                      scikit-learn's two sample photos (shipped with it), for predicting with ImageNet weights
                      such as DeepMind's released F0_haiku.npz.
  three_digits/<class>/*.png
                      a small image folder for the fine-tuning example (`configs/finetune.py:tiny` from the
                      demo run): every test-split image of three classes, in folders named by the class
                      (zero, one, seven: 101 images; dataset.name='folder' holds out every 10th of each
                      class for eval). Class names come from the folder names.

Rerunning writes the same files (existing ones are replaced).
"""
import os
from typing import List

from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from nfnets import console

FOLDER_CLASSES = {0: 'zero', 1: 'one', 7: 'seven'}   # label in digits -> class folder

_OUT = flags.DEFINE_string('out', os.path.join('runs', 'samples'), 'Folder to write into.')


def write_digits(out: str) -> List[str]:
  """The first test image of each digit class, as `<out>/digit_<label>.png`."""
  from nfnets.data import sources  # pylint: disable=g-import-not-at-top
  images, labels = sources.digits_arrays()['test']
  paths = []
  for label in range(10):
    path = os.path.join(out, f'digit_{label}.png')
    Image.fromarray(images[int(np.flatnonzero(labels == label)[0])]).save(path)
    paths.append(path)
  return paths


def write_photos(out: str) -> List[str]:
  """scikit-learn's sample photos as `<out>/flower.jpg` and `<out>/china.jpg`."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  paths = []
  for name in ('flower.jpg', 'china.jpg'):
    paths.append(os.path.join(out, name))
    Image.fromarray(datasets.load_sample_image(name)).save(paths[-1], quality=95)
  return paths


def write_folder(out: str) -> str:
  """`<out>/three_digits/<class>/<i>.png`: every test image of the classes of FOLDER_CLASSES."""
  from nfnets.data import sources  # pylint: disable=g-import-not-at-top
  images, labels = sources.digits_arrays()['test']
  root = os.path.join(out, 'three_digits')
  for label, name in FOLDER_CLASSES.items():
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i, index in enumerate(np.flatnonzero(labels == label)):
      Image.fromarray(images[index]).save(os.path.join(root, name, f'{i:03d}.png'))
  return root


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  digits = write_digits(_OUT.value)
  photos = write_photos(_OUT.value)
  folder = write_folder(_OUT.value)
  counts = {name: len(os.listdir(os.path.join(folder, name))) for name in FOLDER_CLASSES.values()}
  logging.info('%d digit images; an image folder of %d classes: %s', len(digits), len(counts),
               ', '.join(f'{n} {c}' for n, c in counts.items()))
  print(f'Wrote {os.path.join(_OUT.value, "digit_*.png")}, {" and ".join(photos)}, and '
        f'{folder}/{{{",".join(counts)}}}/*.png')
  return 0


def cli():
  """The `nfnets-sample-images` command (pyproject.toml); `python -m tools.sample_images` runs the same."""
  console.run(main)


if __name__ == '__main__':
  cli()
