"""Process memory for the benchmarks: peak resident set and available memory (Linux; macOS for the peak)."""
import resource
import sys


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
