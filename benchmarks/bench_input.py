"""Input throughput on ImageNet-like JPEGs: decode + full F0 augmentation, per CPU core.

  python -m benchmarks.bench_input [--image_size=224 --seconds=20]

Writes synthetic 500x375 JPEGs (about ImageNet's mean size and file size) to a temp folder and runs the
'folder' train path: Inception crop, flip, bicubic resize, MixUp/CutMix, RandAugment 4 layers at magnitude 5.
Per-core rate = images / CPU seconds used by this process, so other load on a shared machine does not skew it.
"""
import os
import tempfile
import time

from absl import app, flags
import numpy as np
from PIL import Image

from configs import base
from nfnets import data

_NUM_FILES = flags.DEFINE_integer('num_files', 256, 'Synthetic JPEGs to write.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Train resolution.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size (one device).')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Time to measure after warm-up.')
_RA = flags.DEFINE_string('ra', '4,5', 'RandAugment layers,magnitude (F0: 4,5).')


def write_jpegs(root: str, num: int, seed: int = 0) -> None:
  """Smooth random colour fields plus noise: photos compress to ~100 KB at 500x375, so should these."""
  rng = np.random.RandomState(seed)
  for i in range(num):
    small = rng.randint(0, 256, (12, 16, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.randint(-25, 26, image.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, f'class_{i % 4}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def main(_):
  layers, magnitude = (int(v) for v in _RA.value.split(','))
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, _NUM_FILES.value)
    size_kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 1024
    config = base.get_config('F0').dataset
    config.name, config.data_dir, config.shuffle_buffer = 'folder', root, 256
    it = data.train_iterator(config, global_batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value,
                             num_classes=4, ra_layers=layers, ra_magnitude=magnitude, seed=0,
                             num_local_devices=1, process_index=0, process_count=1)
    for _ in range(3):   # graph building and pipeline warm-up
      next(it)
    start_wall, start_cpu, batches = time.time(), sum(os.times()[:4]), 0
    while time.time() - start_wall < _SECONDS.value:
      next(it)
      batches += 1
    wall, cpu = time.time() - start_wall, sum(os.times()[:4]) - start_cpu
  images = batches * _BATCH.value
  decoded = 2 * images   # MixUp/CutMix build each image from two decoded examples
  print(f'{_NUM_FILES.value} JPEGs 500x375, mean {size_kb / _NUM_FILES.value:.0f} KB; {_IMAGE_SIZE.value} px, '
        f'RandAugment {layers}x{magnitude}, MixUp+CutMix')
  print(f'wall: {images / wall:.1f} train images/s ({decoded / wall:.1f} decoded/s) on {os.cpu_count()} cores')
  print(f'per CPU core: {images / cpu:.1f} train images/s, {decoded / cpu:.1f} decoded+augmented examples/s '
        f'({cpu:.1f} CPU s over {wall:.1f} s)')


if __name__ == '__main__':
  app.run(main)
