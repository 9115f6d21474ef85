"""What exists only because of XLA:CPU, behind one gate (`active`): on GPU and TPU every function here is a
no-op and nothing in it runs.

The project is developed and tested on CPUs; our users train on GPUs and TPUs. These workarounds make a
CPU run faster or leaner and must never change what an accelerator run does:

  `compiler_options`     XLA:CPU's memory-optimised instruction scheduler for the train step;
  `after_compile`        drops JAX's in-memory caches after an ahead-of-time compile and hands the
                         compiler's freed heap back to the OS (glibc keeps it otherwise);
  `loop_unroll`          unrolls the micro-batch loop: XLA:CPU runs convolutions inside a loop body slowly;
  `conv_lowering`        a per-shape, per-direction lowering of each convolution, measured once per machine
                         and cached (`nfnets.cpu.tuning`).

docs/performance.md has the measurements behind each.
"""
import ctypes
import ctypes.util
import sys
from typing import Callable, Dict, Optional, Sequence

import jax
import numpy as np

from nfnets.cpu import tuning

# Below this many multiply-adds a convolution takes microseconds whichever way it is lowered: measuring
# it would cost more than it could save, so it gets the default lowering.
MIN_TUNED_MACS = 2 ** 24


def active() -> bool:
  """True when JAX runs on XLA:CPU: the only backend this package changes anything on."""
  return jax.default_backend() == 'cpu'


def compiler_options(memory_scheduler: bool) -> Optional[Dict[str, str]]:
  """Compile options for the train step: XLA's memory-optimised scheduler instead of its
  concurrency-optimised default when `memory_scheduler` (config.cpu_memory_scheduler); None elsewhere."""
  if active() and memory_scheduler:
    return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  return None


def after_compile() -> None:
  """After an ahead-of-time compile: clears JAX's in-memory tracing and compile caches (the executable the
  caller holds does not need them; the persistent compilation cache is kept) and returns the freed heap
  to the OS, so the step's own peak starts from a lower resident set."""
  if active():
    jax.clear_caches()
    release_free_memory()


def release_free_memory() -> bool:
  """Hands freed heap pages back to the OS (glibc `malloc_trim(0)`); False off CPU or where unavailable."""
  if not active() or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
    return False


def private_host_copy(x):
  """`x` as a NumPy array the caller does not hold, on CPU: XLA:CPU may use a 64-byte-aligned host array
  as a device buffer without copying it (even with `may_alias=False`). Elsewhere `x` unchanged."""
  return np.array(x, copy=True) if active() else x


def loop_unroll() -> bool:
  """`unroll` for `lax.scan` over micro-batches: the whole loop unrolled on CPU, where a convolution
  inside a loop body runs several times slower; a rolled loop elsewhere (one copy of the body in
  the program)."""
  return active()


def default_conv_lowering(shape) -> str:
  """The unmeasured choice: matmuls for 1x1, per-group convolutions for grouped k x k, else XLA's conv."""
  return 'matmul' if shape.is_1x1 else 'split' if shape.groups > 1 else 'xla'


def conv_lowering(direction: str, shape, candidates: Dict[str, Callable],
                  make_args: Callable[[], Sequence]) -> str:
  """The fastest of `candidates` for one direction ('forward', 'input_grad', 'kernel_grad') of a
  convolution of `shape` (an `nfnets.conv.ConvShape`) on this machine: measured once, then cached."""
  default = default_conv_lowering(shape)
  if not active() or shape.macs < MIN_TUNED_MACS:
    return default
  return tuning.choose(f'conv_{direction}', shape.key, candidates, make_args, default)
