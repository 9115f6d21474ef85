"""Running a sweep's grid points: one `train.py` subprocess per run, resumable, in parallel; run states.

Run states: 'done' (a final eval at training_steps is logged, or the DONE marker exists), 'diverged'
(train.py stopped on a NaN/Inf loss), 'failed' (any other non-zero exit), 'pending' (not run yet, or
interrupted: a rerun resumes it from its checkpoint).
"""
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from absl import logging

from nfnets import console
from research.sweep_grid import REPO_ROOT, Run, SweepError, flag_args

TRAIN_SCRIPT = os.path.join(REPO_ROOT, 'train.py')
DONE_MARKER = 'DONE'            # written after train.py exits 0
FAILED_MARKER = 'FAILED.json'   # {returncode, status, stderr_tail, wall_s}, written after a non-zero exit
STDOUT_LOG, STDERR_LOG = 'stdout.log', 'stderr.log'
STDERR_TAIL_LINES = 8
PROGRESS_EVERY_S = 30.0         # how often the sweep logs each running run's newest step
# train.py's NaN guard (nfnets.trainer.NonFiniteLossError): its exit status and its one `error:` line.
_DIVERGED_PATTERNS = ('became NaN/Inf',)


@dataclasses.dataclass
class RunResult:
  run: Run
  status: str                       # 'done', 'diverged', 'failed', 'pending'
  returncode: Optional[int] = None
  wall_s: Optional[float] = None
  stderr_tail: str = ''
  skipped: bool = False             # found finished (or failed) on disk; not run again


def read_metrics(run_workdir: str) -> List[dict]:
  """The records of `metrics.jsonl` (an unreadable trailing line, from a killed writer, is ignored)."""
  path = os.path.join(run_workdir, 'metrics.jsonl')
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return records


def progress(run: Run) -> Optional[str]:
  """'step S/N | loss L | top1 T%' from the run's newest train record, or None before its first log."""
  path = os.path.join(run.workdir, 'metrics.jsonl')
  try:
    with open(path, 'rb') as f:
      f.seek(max(0, os.path.getsize(path) - 4096))   # the newest records are at the end
      lines = f.read().decode(errors='replace').splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if record.get('kind') == 'train':
      return (f"step {record['step']}/{run.training_steps} | loss {record.get('loss', float('nan')):.4f} | "
              f"top1 {100 * record.get('top1', float('nan')):.2f}%")
  return None


def _final_eval(records: Sequence[dict], training_steps: int) -> Optional[dict]:
  evals = [r for r in records if r.get('kind') == 'eval' and r.get('step', -1) >= training_steps]
  return evals[-1] if evals else None


def run_state(run: Run) -> RunResult:
  """What the run's workdir says: done, diverged/failed (with its FAILED record), or pending."""
  if os.path.exists(os.path.join(run.workdir, DONE_MARKER)) or _final_eval(
      read_metrics(run.workdir), run.training_steps):
    return RunResult(run, 'done')
  failed = os.path.join(run.workdir, FAILED_MARKER)
  if os.path.exists(failed):
    with open(failed) as f:
      info = json.load(f)
    return RunResult(run, info.get('status', 'failed'), info.get('returncode'), info.get('wall_s'),
                     info.get('stderr_tail', ''))
  return RunResult(run, 'pending')


def train_command(run: Run, config_path: str, python: str = sys.executable,
                  train_script: str = TRAIN_SCRIPT) -> List[str]:
  """The train.py command line of one run (argv list)."""
  return [python, train_script, f'--workdir={run.workdir}'] + flag_args(config_path, run.overrides)


def shell_command(run: Run, config_path: str, python: str = sys.executable,
                  train_script: str = TRAIN_SCRIPT) -> str:
  """One shell line for a cluster scheduler: runs from the repo root, touches DONE on success."""
  cmd = ' '.join(shlex.quote(a) for a in train_command(run, config_path, python, train_script))
  return (f'cd {shlex.quote(REPO_ROOT)} && {cmd} && '
          f'touch {shlex.quote(os.path.join(run.workdir, DONE_MARKER))}')


def _tail(path: str, n: int = STDERR_TAIL_LINES) -> str:
  if not os.path.exists(path):
    return ''
  with open(path, errors='replace') as f:
    lines = [l.rstrip() for l in f if l.strip()]
  return '\n'.join(lines[-n:])


def _finish(run: Run, returncode: int, wall_s: float) -> RunResult:
  if returncode == 0 and not _final_eval(read_metrics(run.workdir), run.training_steps):
    # train.py exits 0 when stopped by SIGTERM (preemption) after checkpointing: resumable, not done.
    return RunResult(run, 'pending', 0, wall_s)
  if returncode == 0:
    with open(os.path.join(run.workdir, DONE_MARKER), 'w') as f:
      f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} wall_s={wall_s:.1f}\n')
    return RunResult(run, 'done', 0, wall_s)
  tail = _tail(os.path.join(run.workdir, STDERR_LOG))
  diverged = returncode == console.DIVERGED_EXIT and any(p in tail for p in _DIVERGED_PATTERNS)
  status = 'diverged' if diverged else 'failed'
  with open(os.path.join(run.workdir, FAILED_MARKER), 'w') as f:
    json.dump({'status': status, 'returncode': returncode, 'wall_s': wall_s, 'stderr_tail': tail}, f,
              indent=2)
  return RunResult(run, status, returncode, wall_s, tail)


def run_sweep(runs: Sequence[Run], config_path: str, parallel: int = 1, retry_failed: bool = False,
              python: str = sys.executable, train_script: str = TRAIN_SCRIPT, env: Optional[dict] = None,
              log=logging.info, progress_every_s: float = PROGRESS_EVERY_S) -> List[RunResult]:
  """Runs every unfinished run as a train.py subprocess, `parallel` at a time; returns one result per run.
  `log` gets one line per start, end and skip, and each running run's progress (its newest logged step) at
  most every `progress_every_s` seconds.

  Finished runs are skipped. Runs that failed before (FAILED marker) are skipped too, unless
  `retry_failed`: a NaN divergence is a result of the sweep, not an accident to retry forever.
  Interrupted runs (no marker) are rerun, and train.py resumes them from their last checkpoint.
  """
  if parallel < 1:
    raise SweepError(f'parallel must be >= 1, got {parallel}')
  results: Dict[str, RunResult] = {}
  todo = []
  for run in runs:
    state = run_state(run)
    if state.status == 'done' or (state.status in ('failed', 'diverged') and not retry_failed):
      state.skipped = True
      results[run.name] = state
      log(f'[sweep] skip {run.name}: {state.status}')
    else:
      todo.append(run)
  env = dict(os.environ if env is None else env)
  active = {}  # name -> (Popen, run, start, files)
  shown = {}   # name -> (time of the last progress check, the last progress line logged)
  total, started = len(todo), 0

  def start(run: Run):
    nonlocal started
    os.makedirs(run.workdir, exist_ok=True)
    for marker in (FAILED_MARKER, DONE_MARKER):
      if os.path.exists(os.path.join(run.workdir, marker)):
        os.remove(os.path.join(run.workdir, marker))
    out = open(os.path.join(run.workdir, STDOUT_LOG), 'a')
    err = open(os.path.join(run.workdir, STDERR_LOG), 'a')
    proc = subprocess.Popen(train_command(run, config_path, python, train_script), stdout=out,
                            stderr=err, cwd=REPO_ROOT, env=env)
    started += 1
    active[run.name] = (proc, run, time.time(), (out, err))
    log(f'[sweep] start {started}/{total} {run.name}')
    shown[run.name] = (time.time(), None)

  def on_sigterm(signum, frame):
    raise KeyboardInterrupt(f'signal {signum}')

  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, on_sigterm)  # so the finally below stops our children
  try:
    while todo or active:
      while todo and len(active) < parallel:
        start(todo.pop(0))
      time.sleep(0.2)
      for name, (proc, run, t0, files) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          last_time, last_line = shown[name]
          if time.time() - last_time >= progress_every_s:
            line = progress(run)
            if line and line != last_line:
              log(f'[sweep] {name}: {line}')
            shown[name] = (time.time(), line or last_line)
          continue
        for f in files:
          f.close()
        del active[name]
        results[name] = _finish(run, rc, time.time() - t0)
        r = results[name]
        msg = f'[sweep] {r.status} {name} ({r.wall_s:.0f} s)'
        if r.status != 'done':
          msg += f' exit {rc}: {r.stderr_tail.splitlines()[-1] if r.stderr_tail else ""}'
        log(msg)
  finally:
    for proc, run, _, files in active.values():  # interrupted: stop our children, leave them resumable
      proc.terminate()
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
      for f in files:
        f.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return [results.get(r.name) or run_state(r) for r in runs]
