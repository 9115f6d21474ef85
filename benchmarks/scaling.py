"""Data-parallel scaling: train-step images/s against device count, per-device batch fixed (weak scaling).

  python -m benchmarks.scaling --config=configs/demo.py --devices=1,2,4,8 --per_device_batch=16

Times `Experiment.train_step` (data parallel over the first n local devices, gradients pmean'd) with a
global batch of n x per_device_batch. Efficiency(n) = images/s(n) / (n x images/s(1)); 100% is perfect scaling.
On a CPU the devices are simulated (`jax_num_cpu_devices`) and all share the machine's cores, so this
measures the overhead of the data-parallel program rather than added compute: expect about 1/n there.
On GPU/TPU hosts the real local devices are used. The device counts are timed round-robin, so load from
other users of a shared machine hits them alike.
"""
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

import experiment

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'A config file from configs/.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts to time.')
_PER_DEVICE = flags.DEFINE_integer('per_device_batch', 16, 'Images per device per step.')
_RES = flags.DEFINE_integer('resolution', None, 'Image size (default: the config\'s / model\'s).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per device count per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Round-robin rounds; the median step time over all is kept.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')


def _batch(n, per_device, size, num_classes, seed=0):
  """A host train batch as the input pipeline gives it: uint8 images, int labels."""
  rng = np.random.default_rng(seed)
  return {'images': rng.integers(0, 256, (n * per_device, size, size, 3)).astype(np.uint8),
          'labels': rng.integers(0, num_classes, (n * per_device,)).astype(np.int32)}


def main(argv):
  del argv
  counts = sorted({int(d) for d in _DEVICES.value})
  # Simulated CPU devices (only the CPU backend reads this); must be set before any device is touched.
  jax.config.update('jax_num_cpu_devices', max(counts))
  available = jax.local_devices()
  kind = f'{available[0].device_kind} ({jax.default_backend()}' + (
      ', simulated, sharing the host cores)' if jax.default_backend() == 'cpu' else ')')
  counts = [n for n in counts if n <= len(available)]
  base = _CONFIG.value
  runs = {}
  for n in counts:
    cfg = base.copy_and_resolve_references()
    cfg.batch_size = n * _PER_DEVICE.value
    cfg.grad_accum_steps = 1
    if _RES.value:
      cfg.dataset.image_size = _RES.value
    xp = experiment.Experiment(cfg, devices=available[:n])
    batch = xp.put_batch(_batch(n, _PER_DEVICE.value, xp.image_size, cfg.model.num_classes))
    t = time.time()
    state = xp.init_state()
    state, metrics = xp.train_step(state, batch)
    jax.block_until_ready(metrics)
    runs[n] = {'xp': xp, 'state': state, 'batch': batch, 'times': [], 'compile_s': time.time() - t}
    print(f'{n} device(s): compiled and ran the first step in {runs[n]["compile_s"]:.1f}s', flush=True)
  for _ in range(_ROUNDS.value):
    for n, r in runs.items():
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        r['state'], metrics = r['xp'].train_step(r['state'], r['batch'])
        jax.block_until_ready(metrics)
        r['times'].append(time.perf_counter() - t)
  rows = []
  for n, r in runs.items():
    step_s = statistics.median(r['times'])
    rows.append({'devices': n, 'global_batch': n * _PER_DEVICE.value, 'step_s': step_s,
                 'images_per_sec': n * _PER_DEVICE.value / step_s})
  one = next((row['images_per_sec'] for row in rows if row['devices'] == 1), None)
  for row in rows:
    row['efficiency'] = row['images_per_sec'] / (row['devices'] * one) if one else None
  cfg, size = base, next(iter(runs.values()))['xp'].image_size if runs else None
  print(f'\n{cfg.model.name} at {size} px, {cfg.dtype}, '
        f'{_PER_DEVICE.value} images/device; devices: {kind}; median of {_ROUNDS.value * _STEPS.value} steps')
  print('| devices | global batch | step (ms) | images/s | scaling efficiency |')
  print('|---:|---:|---:|---:|---:|')
  for row in rows:
    eff = f'{100 * row["efficiency"]:.0f}%' if row['efficiency'] is not None else 'n/a'
    print(f'| {row["devices"]} | {row["global_batch"]} | {1000 * row["step_s"]:.1f} | '
          f'{row["images_per_sec"]:.1f} | {eff} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'device_kind': kind, 'config': cfg.model.name, 'rows': rows,
                 'load_average': os.getloadavg()}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
