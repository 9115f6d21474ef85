"""Input cost per train image: the host pipeline (CPU seconds per image) and the device augmentation.

  python -m benchmarks.bench_input [--image_size=224 --seconds=20 --batch_size=64 --device_calls=10]

Host: writes synthetic 500x375 JPEGs (about ImageNet's mean size and file size) to a temp folder and runs
the 'folder' train path as training does: decode, Inception crop, flip, bicubic resize, uint8, one decoded
example per train image. Per-core rate = images / CPU seconds used by this process, so other load on a
shared machine does not skew it; its inverse is the host's CPU seconds per train image.

Device: `jax.jit` of `nfnets.data.device_augment.augment_batch` (MixUp + CutMix, RandAugment at --ra,
normalisation; what the train step adds) on the first local device, on one batch of --batch_size uint8
images: compile time, then the median of --device_calls calls with fresh keys.
"""
import os
import statistics
import tempfile
import time

from absl import app, flags
import jax
import numpy as np
from PIL import Image

from configs import base
from nfnets import data
from nfnets.data import device_augment

_NUM_FILES = flags.DEFINE_integer('num_files', 256, 'Synthetic JPEGs to write.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Train resolution.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size (one device).')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Time to measure the host pipeline after warm-up.')
_RA = flags.DEFINE_string('ra', '4,5', 'RandAugment layers,magnitude (F0: 4,5).')
_DEVICE_CALLS = flags.DEFINE_integer('device_calls', 10, 'Timed calls of the device augmentation (0: skip).')


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


def host_pipeline():
  """(train images/s wall, per CPU core, CPU seconds, wall seconds) of the host train pipeline."""
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, _NUM_FILES.value)
    size_kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 1024
    config = base.get_config('F0').dataset
    config.name, config.data_dir, config.shuffle_buffer = 'folder', root, 256
    it = data.train_iterator(config, global_batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value,
                             num_classes=4, seed=0, num_local_devices=1, process_index=0, process_count=1)
    for _ in range(3):   # graph building and pipeline warm-up
      next(it)
    start_wall, start_cpu, batches = time.time(), sum(os.times()[:4]), 0
    while time.time() - start_wall < _SECONDS.value:
      next(it)
      batches += 1
    wall, cpu = time.time() - start_wall, sum(os.times()[:4]) - start_cpu
  images = batches * _BATCH.value
  print(f'host: {_NUM_FILES.value} JPEGs 500x375, mean {size_kb / _NUM_FILES.value:.0f} KB -> uint8 '
        f'{_IMAGE_SIZE.value} px (decode, crop, flip, resize; one decoded example per train image)')
  print(f'host wall: {images / wall:.1f} train images/s on {os.cpu_count()} cores')
  print(f'host per CPU core: {images / cpu:.1f} train images/s = {1000 * cpu / images:.2f} ms CPU per train '
        f'image ({cpu:.1f} CPU s over {wall:.1f} s)')


def device_augmentation(layers: int, magnitude: int):
  """Compile time and median call time of augment_batch on one batch on the first local device."""
  device = jax.local_devices()[0]
  n, s = _BATCH.value, _IMAGE_SIZE.value
  rng = np.random.RandomState(0)
  images = jax.device_put(rng.randint(0, 256, (n, s, s, 3)).astype(np.uint8), device)
  labels = jax.device_put(rng.randint(0, 1000, n).astype(np.int32), device)
  fn = jax.jit(lambda x, y, k: device_augment.augment_batch(
      x, y, k, num_classes=1000, mixup_alpha=0.2, cutmix=True, ra_layers=layers, ra_magnitude=magnitude))
  key = jax.random.PRNGKey(0)
  t = time.perf_counter()
  compiled = fn.lower(images, labels, key).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(images, labels, key))   # first run: allocations, thread pools
  times = []
  for i in range(_DEVICE_CALLS.value):
    k = jax.random.fold_in(key, i + 1)
    t = time.perf_counter()
    jax.block_until_ready(compiled(images, labels, k))
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  print(f'device: augment_batch (MixUp+CutMix, RandAugment {layers}x{magnitude}, normalise) on '
        f'{device.device_kind} ({jax.default_backend()}), batch {n} at {s} px')
  print(f'device: compile {compile_s:.1f} s; median of {len(times)} calls {1000 * median:.1f} ms = '
        f'{n / median:.1f} images/s')


def main(_):
  layers, magnitude = (int(v) for v in _RA.value.split(','))
  host_pipeline()
  if _DEVICE_CALLS.value:
    device_augmentation(layers, magnitude)


if __name__ == '__main__':
  app.run(main)
