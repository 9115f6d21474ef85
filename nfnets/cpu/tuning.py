"""Measured choice between equivalent implementations of one op, cached per machine.

XLA:CPU's speed for the same convolution or reduction differs several-fold between its formulations, and
which formulation wins differs between CPUs and XLA versions. So an op with several equivalent
implementations (today the `nfnets.conv` lowerings, per convolution shape and direction) asks `choose` at
trace time: the first time a shape is seen on a machine, each candidate is compiled and timed
on random data (interleaved, median of a few runs) and the fastest is kept; later runs read the choice
from a JSON cache.

The cache is one file per machine fingerprint (CPU model, core count, ISA flags, jax/jaxlib version,
backend, XLA_FLAGS) under $NFNETS_TUNING_DIR (default ~/.cache/nfnets). A file whose fingerprint differs
from this machine's (copied from another CPU, or written by another JAX) is ignored, and a file that
cannot be parsed is rebuilt; neither is trusted. NFNETS_TUNING=off skips measuring and uses each op's
default (the tests do, so their numerics do not depend on timing).
"""
import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

from absl import logging
import jax
import jaxlib
import numpy as np

SCHEMA = 1
_REPEATS = 3
_ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_tile',
              'sve', 'asimd')
_lock = threading.Lock()
_caches: Dict[str, 'Cache'] = {}
_used: Dict[str, dict] = {}   # choices this process traced: what bench.py reports
_measured = []                # seconds spent on each measurement in this process


def enabled() -> bool:
  value = os.environ.get('NFNETS_TUNING', 'on').lower()
  if value not in ('on', 'off'):
    raise ValueError(f'NFNETS_TUNING={value!r}; accepted: on, off')
  return value == 'on'


@functools.lru_cache(maxsize=1)
def _cpu_model_and_flags():
  """The first CPU's model name and the ISA flags that matter here (read once: they do not change)."""
  model, flags = None, set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        name, _, value = line.partition(':')
        name = name.strip()
        if name in ('model name', 'Model') and model is None:
          model = value.strip()
        elif name in ('flags', 'Features') and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return model or platform.processor() or platform.machine(), tuple(f for f in _ISA_FLAGS if f in flags)


def fingerprint() -> Dict[str, Any]:
  """What a measured choice depends on; a cache written under any other fingerprint is not used."""
  model, isa = _cpu_model_and_flags()
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  return {'cpu_model': model, 'cores': cores, 'isa': sorted(isa), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'backend': jax.default_backend(),
          'device_kind': jax.local_devices()[0].device_kind, 'xla_flags': os.environ.get('XLA_FLAGS', '')}


def cache_path(fp: Optional[Dict[str, Any]] = None) -> str:
  fp = fp or fingerprint()
  digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
  root = os.environ.get('NFNETS_TUNING_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'nfnets')
  return os.path.join(root, f'tuning-{digest}.json')


class Cache:
  """The choices measured on this machine: {op: {shape key: {'choice': name, 'ms': {name: time}}}}."""

  def __init__(self, path: str, fp: Dict[str, Any]):
    self.path, self.fingerprint, self.entries = path, fp, {}
    if not os.path.exists(path):
      return
    try:
      with open(path) as f:
        data = json.load(f)
      if not isinstance(data, dict) or not isinstance(data.get('entries'), dict):
        raise ValueError('not a tuning cache')
    except (OSError, ValueError) as e:
      logging.warning('Tuning cache %s is unreadable (%s); measuring again and rewriting it.', path, e)
      return
    if data.get('schema') != SCHEMA or data.get('fingerprint') != fp:
      logging.warning('Tuning cache %s was made on another machine or JAX version (%s); ignoring it.',
                      path, data.get('fingerprint'))
      return
    self.entries = data['entries']

  def get(self, op: str, key: str) -> Optional[dict]:
    return self.entries.get(op, {}).get(key)

  def put(self, op: str, key: str, entry: dict) -> None:
    self.entries.setdefault(op, {})[key] = entry
    self.save()

  def save(self) -> None:
    """Atomic: write a temp file beside the cache, then rename over it (no half-written cache)."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix='.tuning-', suffix='.tmp')
      with os.fdopen(fd, 'w') as f:
        json.dump({'schema': SCHEMA, 'fingerprint': self.fingerprint, 'entries': self.entries}, f,
                  indent=1, sort_keys=True)
      os.replace(tmp, self.path)
    except OSError as e:   # a read-only home still trains, it just measures again next time
      logging.warning('Could not write the tuning cache %s: %s', self.path, e)


def _cache() -> Cache:
  fp = fingerprint()
  path = cache_path(fp)
  if path not in _caches:
    _caches[path] = Cache(path, fp)
  return _caches[path]


def time_candidates(candidates: Dict[str, Callable], args: Sequence[np.ndarray],
                    repeats: int = _REPEATS) -> Dict[str, float]:
  """Median milliseconds of each jitted candidate on `args`, runs interleaved so load hits all alike."""
  with jax.ensure_compile_time_eval():   # runs eagerly even when called while tracing a model
    compiled = {}
    for name, fn in candidates.items():
      compiled[name] = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled[name](*args))   # warm-up
    times = {name: [] for name in candidates}
    for _ in range(repeats):
      for name, fn in compiled.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def choose(op: str, key: str, candidates: Dict[str, Callable], make_args: Callable[[], Sequence[np.ndarray]],
           default: str) -> str:
  """The fastest candidate for `op` at `key` on this machine (measured once, then cached).

  candidates: name -> function of `make_args()`'s arrays; all compute the same value.
  default: returned without measuring when tuning is off or there is only one candidate.
  """
  if default not in candidates:
    raise ValueError(f'default {default!r} is not a candidate of {op}: {sorted(candidates)}')
  if not enabled() or len(candidates) == 1:
    return default
  with _lock:
    cache = _cache()
    entry = cache.get(op, key)
    if entry is None or entry.get('choice') not in candidates:
      if not _measured:
        logging.info('Measuring op implementations on this machine, once per shape (about a minute for '
                     'F0); the choices are cached in %s', cache.path)
      start = time.perf_counter()
      ms = time_candidates(candidates, make_args())
      entry = {'choice': min(ms, key=ms.get), 'ms': {k: round(v, 3) for k, v in ms.items()}}
      logging.debug('Tuned %s %s: %s', op, key, ' '.join(f'{k}={v:.2f}ms' for k, v in entry['ms'].items()))
      cache.put(op, key, entry)
      _measured.append(time.perf_counter() - start)
      if len(_measured) % 20 == 0:
        logging.info('... measured %d op shapes (%.0f s)', len(_measured), sum(_measured))
    _used[f'{op} {key}'] = entry
    return entry['choice']


def used_choices() -> Dict[str, dict]:
  """Every choice this process has made so far: '<op> <key>' -> {'choice', 'ms'}."""
  return dict(_used)


def random_args(*shapes_and_dtypes, seed: int = 0):
  """Normal random arrays for timing (the values do not matter, only shapes and dtypes)."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape, np.float32).astype(dtype) for shape, dtype in shapes_and_dtypes]
