"""Process memory: peak resident set, available memory, and returning freed heap memory to the OS (Linux)."""
import ctypes
import ctypes.util
import resource
import sys

import jax


def peak_rss_bytes() -> int:
  """The process's peak resident set so far (getrusage ru_maxrss; never reset)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == 'darwin' else rss * 1024


def available_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux); a very large number where it cannot be read."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 62


def release_free_memory() -> bool:
  """Hands freed heap pages back to the OS (glibc `malloc_trim(0)`); False where that is unavailable.

  XLA's compiler frees most of what it allocates, but glibc keeps the freed pages in the process. Calling
  this after a compile lowers the baseline that the step's own peak adds to.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
    return False


def drop_compile_caches() -> None:
  """After an ahead-of-time compile: clears JAX's tracing, lowering and compilation caches (the compiled
  executable a caller holds does not need them) and returns the freed heap to the OS. Jitted functions
  called later recompile on their next call."""
  jax.clear_caches()
  release_free_memory()


def compile_with_low_memory(jitted, *args, cpu_memory_scheduler: bool = True):
  """Compiles `jitted` ahead of time for `args` (arrays or ShapeDtypeStructs), then frees what compiling
  left behind (`drop_compile_caches`).

  On CPU, `cpu_memory_scheduler` selects XLA's memory-optimised instruction scheduler instead of its
  concurrency-optimised default. (The older boolean flag xla_cpu_enable_concurrency_optimized_scheduler is
  accepted as a compile option but has no effect in jax 0.10; this enum does.) The measured effect is in
  docs/performance.md.
  """
  options = {}
  if jax.default_backend() == 'cpu' and cpu_memory_scheduler:
    options['xla_cpu_scheduler_type'] = 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
  compiled = jitted.lower(*args).compile(compiler_options=options or None)
  drop_compile_caches()
  return compiled
