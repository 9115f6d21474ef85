"""Start-up time of a run, with and without the persistent compilation cache.

  python -m benchmarks.startup --config=configs/demo.py --rounds=2

Each round launches `train.py` twice for one step: first with an empty compilation cache (cold: every
program is compiled), then with the cache that run filled (warm: a restarted run). Prints the seconds from
launch to the first train log line (step 1) and to the end of the process (which adds the final eval and
checkpoint). Runs go to a temporary folder that is removed afterwards.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = flags.DEFINE_string('config', 'configs/demo.py', 'The config file train.py runs.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Cold + warm pairs to run.', lower_bound=1)
FIRST_STEP = re.compile(r'\] step 1/1 \|')


def launch(config: str, workdir: str, cache: str):
  """(seconds to the step-1 log line, seconds to exit) of one `train.py` run of one step."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  t0 = time.monotonic()
  proc = subprocess.Popen([sys.executable, 'train.py', f'--config={config}', f'--workdir={workdir}',
                           '--config.training_steps=1', '--config.log_every=1', '--config.eval_every=0',
                           f'--config.compilation_cache_dir={cache}'],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first, lines = None, []
  for line in proc.stderr:
    lines.append(line)
    if first is None and FIRST_STEP.search(line):
      first = time.monotonic() - t0
  if proc.wait() != 0 or first is None:
    raise SystemExit(f'benchmarks.startup: train.py failed:\n{"".join(lines[-20:])}')
  return first, time.monotonic() - t0


def main(argv):
  del argv
  with tempfile.TemporaryDirectory(prefix='nfnets_startup_') as tmp:
    cache = os.path.join(tmp, 'cache')
    for r in range(_ROUNDS.value):
      for kind in ('cold', 'warm'):
        if kind == 'cold':
          shutil.rmtree(cache, ignore_errors=True)
        first, total = launch(_CONFIG.value, os.path.join(tmp, f'run_{r}_{kind}'), cache)
        print(f'round {r + 1} {kind}: first step after {first:.1f} s, process done after {total:.1f} s',
              flush=True)


if __name__ == '__main__':
  app.run(main)
