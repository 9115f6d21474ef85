"""What the command-line tests share: the environment of their subprocesses, a short training run's flags,
and reading a command's console."""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses: one CPU device (a short train run compiles in half the time of 4 simulated devices), the
# suite's fast-compile XLA flags (Makefile, TEST_ENV: a short demo run takes 25 s instead of 42 s) and the
# tests' persistent compilation cache (conftest.py), so identical programs compile once.
XLA_FLAGS = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', '')).strip()
ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=XLA_FLAGS, NFNETS_TUNING='off',
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.pytest_cache', 'jax_cache'),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
# A 4-step demo run: the same flags in every module, so their train steps are one cached program.
TRAIN = ['--config.training_steps=4', '--config.batch_size=16', '--config.eval_every=0',
         '--config.checkpoint_every=4', '--config.log_every=4', '--config.model.conv_impl=xla',
         '--config.optimizer.warmup_epochs=0.01']
# An absl line: `I1207 02:22:33.061221 140541595638656 train.py:110] message`.
ABSL_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ')
PROJECT_FILES = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '**', '*.py'), recursive=True)
                 if '/.venv/' not in p and '/tests/' not in p}


def run_tool(*args, cwd=ROOT, env=None, python=(sys.executable,), timeout=600):
  """`python <args>` (a script or `-m module`) from the repository root."""
  return subprocess.run([*python, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                        timeout=timeout)


def console_lines(stderr: str):
  """(the project's absl lines, every other non-empty line) of a command's stderr."""
  ours, others = [], []
  for line in stderr.splitlines():
    if not line.strip():
      continue
    m = ABSL_LINE.match(line)
    (ours if m and m.group(1) in PROJECT_FILES else others).append(line)
  return ours, others


def error_line(proc, code: int) -> str:
  """The one `error:` line of a failed command: exit status `code`, no traceback, and nothing else on
  stderr but the project's own lines."""
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  ours, others = console_lines(proc.stderr)
  errors = [line for line in others if line.startswith('error:')]
  assert len(errors) == 1 and len(others) == 1, proc.stderr[-3000:]
  return errors[0]
