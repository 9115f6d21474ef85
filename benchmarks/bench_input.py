"""Input cost per train image: the host pipeline (CPU seconds per image) and the device augmentation.

  python -m benchmarks.bench_input [--image_size=224 --seconds=20 --batch_size=64 --workers=0,2 --rounds=3
                                    --device_calls=10]

Host: writes synthetic 500x375 JPEGs (about ImageNet's mean size and file size) to a temp folder and runs
the 'folder' train stream as training does (nfnets.data.train_iterator: Grain reading by index, decode,
Inception crop, flip, bicubic resize, uint8, one decoded example per train image), in threads and with each
--workers count of Grain worker processes, and beside it the tf.data pipeline the stream replaced (the
same TF preprocessing ops per image, run by tf.data's parallel map) on the same JPEGs. Per-core rate =
images / CPU seconds used by this process and its worker processes, so other load on a shared machine
does not skew it; its inverse is the host's CPU seconds per train image. With --rounds > 1 the pipelines
take turns, round after round, and the median of each is printed last.

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
import psutil

from configs import base
from nfnets import data
from nfnets.data import device_augment

_NUM_FILES = flags.DEFINE_integer('num_files', 256, 'Synthetic JPEGs to write.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Train resolution.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size (one device).')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Time to measure the host pipeline after warm-up.')
_RA = flags.DEFINE_string('ra', '4,5', 'RandAugment layers,magnitude (F0: 4,5).')
_DEVICE_CALLS = flags.DEFINE_integer('device_calls', 10, 'Timed calls of the device augmentation (0: skip).')
_WORKERS = flags.DEFINE_list('workers', ['0'], 'Grain worker process counts to time (0: threads only).')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Times each host pipeline is timed, taking turns.')


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


def cpu_seconds() -> float:
  """CPU seconds of this process and its live children (Grain's workers)."""
  me = psutil.Process()
  return sum(sum(p.cpu_times()[:2]) for p in [me] + me.children(recursive=True))


def tfdata_batches(root: str, batch: int, image_size: int):
  """The tf.data pipeline the Grain stream replaced, on the same files: file list, shuffle, parallel
  deterministic map of the same TF ops (preprocess.train_image, clipped and rounded to uint8), batch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nfnets.data import preprocess  # pylint: disable=g-import-not-at-top
  paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
  ds = tf.data.Dataset.from_tensor_slices(paths).shuffle(256, seed=0).repeat().enumerate()

  def crop(position, path):
    key = tf.stack([tf.constant(0, tf.int64), position])
    image = preprocess.train_image(tf.io.read_file(path), key, encoded=True, image_size=image_size,
                                   random_crop=True, crop_area_min=0.08, random_flip=True)
    return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)

  options = tf.data.Options()
  options.deterministic = True
  ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True).prefetch(2)
  return ds.with_options(options).as_numpy_iterator()


def grain_batches(root: str, batch: int, image_size: int, workers: int):
  config = base.get_config('F0').dataset
  config.name, config.data_dir, config.num_workers = 'folder', root, workers
  return data.train_iterator(config, global_batch_size=batch, image_size=image_size, num_classes=4, seed=0,
                             process_index=0, process_count=1)


def time_host(name: str, it) -> float:
  """Prints wall and per-core train images/s of `it` after a warm-up; returns the per-core rate."""
  for _ in range(3):   # graph building, worker start, pipeline warm-up
    next(it)
  start_wall, start_cpu, batches = time.time(), cpu_seconds(), 0
  while time.time() - start_wall < _SECONDS.value:
    next(it)
    batches += 1
  wall, cpu = time.time() - start_wall, cpu_seconds() - start_cpu
  images = batches * _BATCH.value
  print(f'host {name}: {images / cpu:.1f} train images/s per CPU core = {1000 * cpu / images:.2f} ms CPU per '
        f'train image; wall {images / wall:.1f} images/s on {os.cpu_count()} cores ({cpu:.1f} CPU s over '
        f'{wall:.1f} s)', flush=True)
  return images / cpu


def host_pipeline():
  """Times the Grain stream (threads, then each --workers count) and the tf.data pipeline on one folder."""
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, _NUM_FILES.value)
    size_kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) / 1024
    print(f'host: {_NUM_FILES.value} JPEGs 500x375, mean {size_kb / _NUM_FILES.value:.0f} KB -> uint8 '
          f'{_IMAGE_SIZE.value} px (decode, crop, flip, resize; one decoded example per train image)')
    rates = {}
    for _ in range(_ROUNDS.value):
      for workers in map(int, _WORKERS.value):
        name = f'Grain stream, {workers} worker processes' if workers else 'Grain stream, threads'
        it = grain_batches(root, _BATCH.value, _IMAGE_SIZE.value, workers)
        rates.setdefault(name, []).append(time_host(name, it))
        it.close()
      name = 'tf.data pipeline (before)'
      rates.setdefault(name, []).append(
          time_host(name, tfdata_batches(root, _BATCH.value, _IMAGE_SIZE.value)))
    if _ROUNDS.value > 1:
      for name, values in rates.items():
        print(f'host {name}: median {statistics.median(values):.1f} train images/s per CPU core '
              f'({", ".join(f"{v:.0f}" for v in values)})')


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
