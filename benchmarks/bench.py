"""Times the experiment's own train (or eval) step: compile time, median step time, images/s, FLOP/s, MFU.

  python -m benchmarks.bench --config=configs/f0.py --batch_size=8 --resolution=192 --dtype=float32 --steps=5
  python -m benchmarks.bench --config=configs/f0.py --variant=auto,xla      # lowerings side by side, one process
  python -m benchmarks.bench --config=configs/f0.py --mode=eval --json=/tmp/eval.json

The step timed is the experiment's train step (one program, the state donated) on one device, compiled by
`Experiment.compile_train_step` and fed batches placed with `Experiment.put_batch`, so it compiles and runs
exactly as in training (on CPU config.cpu_memory_scheduler included; override it with
--cpu_memory_scheduler).
Several comma-separated --variant values (conv lowerings, see nfnets/conv.py) are compiled in the same
process and timed round-robin, so a noisy shared machine slows them alike.

Memory: `peak_memory_bytes` is the process's peak resident set (getrusage ru_maxrss) at the end of the
run, so it covers Python, the libraries, the compiled step, the state and the step's buffers (TensorFlow is
not imported: the batch is synthetic). The step is compiled from shapes before the state exists; then, as
in training, `nfnets.cpu.after_compile` runs (on CPU: JAX's in-memory caches dropped, the compiler's freed
heap returned to the OS) before the state is built. It describes one variant only when one is benchmarked;
`xla_memory_bytes` is XLA's own estimate for each compiled step (arguments + outputs + temporaries -
donated aliases). That estimate is compared with the machine's available memory right after
compiling, and a variant that cannot fit stops with a message naming the memory needed.
"""
import json
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

import experiment
import nfnets
from benchmarks import process_memory
from nfnets import conv as conv_lib
from nfnets import cpu
from nfnets.cpu import tuning
from nfnets.devices import SPLIT

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/f0.py', 'A config file from configs/.')
_VARIANT = flags.DEFINE_string('variant', 'auto',
                               f'Conv lowering(s), comma-separated; each of {conv_lib.IMPLS}.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Time the train step or the eval step.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_RES = flags.DEFINE_integer('resolution', None, 'Image size (default: the model\'s train/test size).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'], 'Compute dtype.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per variant, after the warm-up.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps per variant after compiling.')
_REMAT = flags.DEFINE_bool('remat', None, 'Override config.remat (recompute blocks in the backward).')
_MEMSCHED = flags.DEFINE_bool('cpu_memory_scheduler', None,
                                'Override config.cpu_memory_scheduler (XLA:CPU memory-optimized scheduler).')
_CACHE = flags.DEFINE_bool('compilation_cache', False,
                            'Use the persistent compilation cache (config.compilation_cache_dir). Off by default, '
                            'so compile_time_s times a compile, not a load from the cache.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_PEAK_N = flags.DEFINE_integer('peak_matmul_n', 2048, 'Size of the square matmul that measures peak.')


class DoesNotFitError(RuntimeError):
  pass


def xla_memory_bytes(compiled) -> int:
  """XLA's estimate of a compiled step's memory: arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  if isinstance(m, (list, tuple)):
    m = m[0]
  if m is None:
    return 0
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes - m.alias_size_in_bytes)


def check_fits(needed: int, label: str, available: int = None):
  available = process_memory.available_memory_bytes() if available is None else available
  if needed > available:
    raise DoesNotFitError(
        f'{label} needs about {needed / 2**30:.2f} GiB (XLA estimate of the compiled step), but only '
        f'{available / 2**30:.2f} GiB is available. Reduce --batch_size or --resolution, or pass '
        f'--remat.')


def measure_matmul_peak(dtype, n: int, repeats: int = 5) -> float:
  """FLOP/s of a dense n x n x n matmul on the default device: the MFU denominator."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype) / n
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def make_config(base, variant: str, batch_size: int, resolution, dtype: str, remat,
                cpu_memory_scheduler=None, compilation_cache=False):
  c = base.copy_and_resolve_references()
  c.batch_size = batch_size
  c.grad_accum_steps = 1
  c.dtype = dtype
  c.model.conv_impl = variant
  c.dataset.name = 'fake'  # no files; the batch is synthetic
  # The recipe's step count is for batch 4096; at a small batch the warm-up alone would exceed it.
  c.training_steps = 1 << 30
  if not compilation_cache:
    c.compilation_cache_dir = ''
  if resolution:
    c.dataset.image_size = resolution
    c.dataset.eval_image_size = resolution
  if remat is not None:
    c.remat = remat
  if cpu_memory_scheduler is not None:
    c.cpu_memory_scheduler = cpu_memory_scheduler
  return c


def synthetic_batch(xp, mode: str, place: bool = True):
  """A batch as the input pipeline delivers it: uint8 train pixels (fake data: the step only normalises
  them, as timm's step takes ready tensors) or float 0..255 eval crops, and int labels."""
  rng = np.random.default_rng(0)
  n = xp.local_devices * xp.per_device_batch
  size = xp.image_size if mode == 'train' else xp.eval_image_size
  labels = rng.integers(0, xp.config.model.num_classes, size=(n,)).astype(np.int32)
  if mode == 'eval':
    batch = {'images': rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32), 'labels': labels,
             'mask': np.ones((n,), np.float32)}
  else:
    batch = {'images': rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8), 'labels': labels}
  return xp.put_batch(batch) if place else batch


class Runner:
  """One variant: its experiment, compiled step, state and batch."""

  def __init__(self, config, variant: str, mode: str):
    self.variant, self.mode = variant, mode
    self.xp = xp = experiment.Experiment(config, devices=jax.local_devices()[:1])
    # Compile from shapes alone, before the state exists, so the compiler's working memory and the
    # state are never resident together; then hand the compiler's freed heap back to the OS.
    shapes = xp.state_shapes()
    host_batch = synthetic_batch(xp, mode, place=False)
    split = jax.sharding.NamedSharding(xp.mesh, SPLIT)
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split), host_batch)
    t = time.perf_counter()
    if mode == 'train':  # exactly as the trainer compiles it
      self.compiled = xp.compile_train_step(shapes, batch_shapes)
    else:
      self.compiled = xp.eval_step.lower(shapes.params, shapes.ema_params, batch_shapes).compile()
      cpu.after_compile()
    self.compile_time_s = time.perf_counter() - t
    self.rss_after_compile = process_memory.peak_rss_bytes()
    self.xla_memory_bytes = xla_memory_bytes(self.compiled)
    check_fits(self.xla_memory_bytes, f'{config.model.name} {mode} step ({variant}, batch {config.batch_size})')
    self.batch = xp.put_batch(host_batch)
    self.state = jax.block_until_ready(xp.init_state())
    cpu.after_compile()  # the state constructor's compile; in training, the step's compile runs it last
    self.rss_after_init = process_memory.peak_rss_bytes()
    self.times, self.cpu_times = [], []

  def step(self):
    """Runs one step and waits for it (the bench syncs each step to time it; training does not)."""
    t, c = time.perf_counter(), time.process_time()
    if self.mode == 'train':
      self.state, metrics = self.compiled(self.state, self.batch)
    else:
      metrics = self.compiled(self.state.params, self.state.ema_params, self.batch)
    jax.block_until_ready(metrics)
    if self.mode == 'train':
      jax.block_until_ready(self.state)
    self.cpu_times.append(time.process_time() - c)
    return time.perf_counter() - t


def tuning_report() -> dict:
  """The op implementations measured and chosen in this process (see nfnets/cpu/tuning.py), with a count of
  each choice per op: e.g. {'conv_kernel_grad': {'split': 9, 'matmul': 12}}."""
  choices = tuning.used_choices()
  summary = {}
  for key, entry in choices.items():
    op = key.split(' ', 1)[0]
    summary.setdefault(op, {}).setdefault(entry['choice'], 0)
    summary[op][entry['choice']] += 1
  return {'enabled': tuning.enabled(), 'cache': tuning.cache_path(), 'fingerprint': tuning.fingerprint(),
          'summary': summary, 'choices': choices}


def run(config, variants, mode='train', batch_size=8, resolution=None, dtype='float32', steps=5,
        warmup=1, remat=None, peak_matmul_n=2048, log=print, cpu_memory_scheduler=None,
        compilation_cache=False):
  """Benchmarks each variant; returns one result dict per variant (keys as documented in the module)."""
  for v in variants:
    conv_lib.resolve_impl(v, 2)  # validates the name before any compile
  runners = []
  for v in variants:
    cfg = make_config(config, v, batch_size, resolution, dtype, remat, cpu_memory_scheduler, compilation_cache)
    r = Runner(cfg, v, mode)
    log(f'[{v}] compiled in {r.compile_time_s:.1f} s; XLA memory estimate '
        f'{r.xla_memory_bytes / 2**30:.2f} GiB; peak RSS after compile {r.rss_after_compile / 2**30:.2f} GiB, '
        f'after creating the state {r.rss_after_init / 2**30:.2f} GiB')
    runners.append(r)
  for r in runners:
    for _ in range(warmup):
      r.step()
  for _ in range(steps):  # round-robin, so load changes hit every variant alike
    for r in runners:
      r.times.append(r.step())
  # The run's dtype is the MFU denominator; f32 and bf16 both, because bf16 is only worth a lowering where
  # the CPU's matmul runs faster in it (AVX-512 BF16 / AMX in use).
  peaks = {d: measure_matmul_peak(jnp.dtype(d), peak_matmul_n) for d in sorted({'float32', 'bfloat16', dtype})}
  peak = peaks[dtype]
  tuned = tuning_report()
  rss = process_memory.peak_rss_bytes()
  results = []
  for r in runners:
    xp = r.xp
    size = xp.image_size if mode == 'train' else xp.eval_image_size
    macs = nfnets.registry.plan_from_config(xp.config.model).macs(size)  # the model the config describes
    # Train: forward + two backward products = 3 x 2 x MACs per image. Eval: raw and EMA forwards.
    flops_per_image = (6 if mode == 'train' else 4) * macs
    step_time = statistics.median(r.times)
    ips = batch_size / step_time
    results.append({
        'model': xp.config.model.name, 'mode': mode, 'variant': r.variant,
        'resolved_impl_grouped': conv_lib.resolve_impl(r.variant, 2),
        'backend': jax.default_backend(), 'batch_size': batch_size, 'resolution': size, 'dtype': dtype,
        'remat': bool(xp.config.remat), 'cpu_memory_scheduler': bool(xp.config.cpu_memory_scheduler),
        'steps': steps,
        'compile_time_s': r.compile_time_s, 'step_time_s': step_time,
        'step_times_s': r.times, 'images_per_sec': ips,
        # The eval step runs the raw and the EMA params: two forward passes per image.
        'forward_images_per_sec': ips * (1 if mode == 'train' else 2),
        # Process CPU seconds per step (all threads): less sensitive to other users' load than wall time.
        'step_cpu_time_s': statistics.median(r.cpu_times[-steps:]),
        'flops_per_image': flops_per_image, 'flops_per_sec': ips * flops_per_image,
        'peak_flops_per_sec': peak, 'mfu': ips * flops_per_image / peak,
        'matmul_peak_flops_per_sec': peaks, 'tuning': tuned,
        'peak_memory_bytes': rss, 'xla_memory_bytes': r.xla_memory_bytes,
    })
  return results


def main(argv):
  del argv
  variants = [v.strip() for v in _VARIANT.value.split(',') if v.strip()]
  try:
    results = run(_CONFIG.value, variants, _MODE.value, _BATCH.value, _RES.value, _DTYPE.value,
                  _STEPS.value, _WARMUP.value, _REMAT.value, _PEAK_N.value,
                  cpu_memory_scheduler=_MEMSCHED.value, compilation_cache=_CACHE.value)
  except DoesNotFitError as e:
    print(f'benchmarks.bench: {e}', file=sys.stderr)
    sys.exit(2)
  for r in results:
    print(f"{r['model']} {r['mode']} [{r['variant']}] batch {r['batch_size']} @ {r['resolution']} px "
          f"{r['dtype']}: compile {r['compile_time_s']:.1f} s, step {r['step_time_s']:.3f} s (median of "
          f"{r['steps']}; CPU {r['step_cpu_time_s']:.2f} s), {r['images_per_sec']:.2f} img/s "
          f"({r['forward_images_per_sec']:.2f} forward passes/s), {r['flops_per_sec'] / 1e9:.1f} GFLOP/s, "
          f"MFU {r['mfu']:.1%} of {r['peak_flops_per_sec'] / 1e9:.0f} GFLOP/s matmul, peak RSS "
          f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, XLA estimate {r['xla_memory_bytes'] / 2**30:.2f} GiB")
  tuned = results[0]['tuning']
  if tuned['summary']:
    print('measured choices (nfnets/cpu/tuning.py): ' + '; '.join(
        f"{op} {dict(sorted(c.items()))}" for op, c in sorted(tuned['summary'].items())))
  peaks = results[0]['matmul_peak_flops_per_sec']
  print(f"matmul peak: float32 {peaks['float32'] / 1e9:.0f}, bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
  if len(results) > 1:
    base = results[0]
    for r in results[1:]:
      print(f"{r['variant']} / {base['variant']} step time: {r['step_time_s'] / base['step_time_s']:.2f}x")
  if _JSON.value:
    out = results[0] if len(results) == 1 else {'results': results, **results[0]}
    with open(_JSON.value, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  app.run(main)
