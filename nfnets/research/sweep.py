"""Hyper-parameter sweeps over `train.py`: grid expansion, validation, resumable parallel runs, summaries.

A sweep is a base config file plus a grid of `--config.<field>=<value>` overrides. Every grid point runs
`train.py` as its own subprocess in its own sub-workdir, so a crash or a NaN in one run cannot take down the
others; it is recorded as failed (exit code and the last stderr lines) and the sweep goes on.

    runs = sweep.make_runs('configs/demo.py', 'runs/sweep',
                           sweep.grid(sweep.axis('optimizer.agc.clipping', [0.01, 0.04]),
                                      sweep.axis('batch_size', [256, 1024])))
    sweep.run_sweep(runs, parallel=2)
    rows = sweep.write_summary('runs/sweep', runs)

Run states: 'done' (a final eval at training_steps is logged, or the DONE marker exists), 'diverged'
(train.py stopped on a NaN/Inf loss), 'failed' (any other non-zero exit), 'pending' (not run yet, or
interrupted: a rerun resumes it from its checkpoint).
"""
import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from absl import flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, 'train.py')
DONE_MARKER = 'DONE'            # written after train.py exits 0
FAILED_MARKER = 'FAILED.json'   # {returncode, status, stderr_tail, wall_s}, written after a non-zero exit
STDOUT_LOG, STDERR_LOG = 'stdout.log', 'stderr.log'
STDERR_TAIL_LINES = 8
# Markers of train.py's NaN guard (experiment.NonFiniteLossError) in a failed run's stderr.
_DIVERGED_PATTERNS = ('NonFiniteLossError', 'became NaN/Inf')

Overrides = Dict[str, str]


class SweepError(ValueError):
  """A sweep that cannot start: an unknown field, an unparsable value, an empty value list."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One grid point: its overrides (field -> value string, grid order) and its own workdir."""
  name: str
  overrides: Overrides
  workdir: str
  training_steps: int   # of the resolved config, to recognise a finished run


@dataclasses.dataclass
class RunResult:
  run: Run
  status: str                       # 'done', 'diverged', 'failed', 'pending'
  returncode: Optional[int] = None
  wall_s: Optional[float] = None
  stderr_tail: str = ''
  skipped: bool = False             # found finished (or failed) on disk; not run again


# ------------------------------------------------------------------------------------------ grid
def format_value(value: Any) -> str:
  """The command-line spelling of a value: `True`/`False` for bools, repr-free numbers, strings as is."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  return str(value)


def axis(field: str, values: Iterable[Any]) -> List[Overrides]:
  """One grid axis that sets `field` to each of `values` in turn."""
  values = list(values)
  if not field or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*', field):
    raise SweepError(f'Bad sweep field name {field!r}: expected a dotted config path like '
                     "'optimizer.agc.clipping'")
  if not values:
    raise SweepError(f'Sweep over {field!r} has an empty value list; give at least one value, e.g. '
                     f'--sweep={field}=0.01,0.02')
  strs = [format_value(v) for v in values]
  if any(s == '' for s in strs):
    raise SweepError(f'Sweep over {field!r} has an empty value in {strs!r}')
  if len(set(strs)) != len(strs):
    raise SweepError(f'Sweep over {field!r} repeats a value: {strs!r}')
  return [{field: s} for s in strs]


def parse_sweep_flag(spec: str) -> List[Overrides]:
  """`'optimizer.agc.clipping=0.01,0.02'` -> an axis. Values are comma-separated."""
  if '=' not in spec:
    raise SweepError(f'Bad --sweep={spec!r}: expected FIELD=V1,V2,... e.g. --sweep=batch_size=256,1024')
  field, values = spec.split('=', 1)
  field = field.strip().removeprefix('config.')
  vals = [v.strip() for v in values.split(',')] if values.strip() else []
  if vals and any(not v for v in vals):
    raise SweepError(f'Bad --sweep={spec!r}: an empty value between commas')
  return axis(field, vals)


def grid(*axes: Sequence[Overrides]) -> List[Overrides]:
  """The Cartesian product of axes; each point merges one entry of every axis (later axes vary fastest).

  An axis is a list of override dicts, so one axis may set several fields together (e.g. batch_size
  with the training_steps that keep the epoch count fixed) or mix settings ({agc.enabled: False} and
  {agc.clipping: 0.01}). A field set by two axes is an error.
  """
  if not axes:
    return [{}]
  for a in axes:
    if not a:
      raise SweepError('A sweep axis has no values')
  points = []
  for combo in itertools.product(*axes):
    point: Overrides = {}
    for part in combo:
      for k, v in part.items():
        if k in point:
          raise SweepError(f'Field {k!r} is set by two sweep axes')
        point[k] = format_value(v)
    points.append(point)
  return points


def run_name(overrides: Mapping[str, str]) -> str:
  """A readable, filesystem-safe sub-workdir name: 'batch_size=256,optimizer.agc.clipping=0.01'."""
  if not overrides:
    return 'base'
  name = ','.join(f'{k}={v}' for k, v in overrides.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)


# ------------------------------------------------------------------------------------------ config
def _flag_args(config_path: str, overrides: Mapping[str, str]) -> List[str]:
  return [f'--config={config_path}'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def resolve_config(config_path: str, overrides: Mapping[str, str] = None):
  """The config train.py would see for these overrides, parsed by the same ml_collections flag machinery.

  Raises SweepError naming the field when a field does not exist or a value does not parse.
  """
  overrides = dict(overrides or {})
  if not os.path.exists(config_path.split(':', 1)[0]):
    raise SweepError(f'Config file {config_path!r} does not exist')
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # config files import `configs.base`
  try:
    base = _parse_config(config_path, {})
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'Cannot load config {config_path!r}: {e}') from e
  for field in overrides:
    if not _has_field(base, field):
      raise SweepError(f'Config {config_path!r} has no field {field!r}'
                       + _did_you_mean(base, field) + '; a sweep can only set existing fields')
  try:
    return _parse_config(config_path, overrides)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'Bad value in {_fmt_overrides(overrides)} for config {config_path!r}: {e}') from e


def _parse_config(config_path: str, overrides: Mapping[str, str]):
  """Parses `--config=... --config.k=v ...` exactly as train.py's flag does (lock_config=True)."""
  argv = ['train.py'] + _flag_args(config_path, overrides)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv['config'].value


def _has_field(config, field: str) -> bool:
  node = config
  for part in field.split('.'):
    try:
      keys = list(node.keys())
    except AttributeError:
      return False
    if part not in keys:
      return False
    node = node[part]
  return True


def _leaf_fields(config, prefix='') -> List[str]:
  out = []
  for k in config.keys():
    v = config[k]
    path = prefix + k
    out.extend(_leaf_fields(v, path + '.') if hasattr(v, 'keys') else [path])
  return out


def _did_you_mean(config, field: str) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(field, _leaf_fields(config), n=3, cutoff=0.5)
  return f' (did you mean {", ".join(close)}?)' if close else ''


def _fmt_overrides(overrides: Mapping[str, str]) -> str:
  return ' '.join(f'{k}={v}' for k, v in overrides.items()) or 'no overrides'


def make_runs(config_path: str, workdir: str, points: Sequence[Overrides],
              fixed: Optional[Mapping[str, Any]] = None) -> List[Run]:
  """Validates every grid point against the config (before anything runs) and gives each a sub-workdir.

  Args:
    points: from `grid(...)`.
    fixed: overrides applied to every run (the CLI's `--config.<field>=<value>`), before the grid's.
  """
  fixed = {k: format_value(v) for k, v in (fixed or {}).items()}
  clash = sorted(set(fixed) & set().union(*points)) if points else []
  if clash:
    raise SweepError(f'Fields {clash} are both fixed and swept')
  if not points:
    raise SweepError('The sweep grid is empty')
  runs, names = [], set()
  for point in points:
    overrides = dict(fixed, **point)
    config = resolve_config(config_path, overrides)
    name = run_name(point)
    if name in names:
      raise SweepError(f'Two grid points share the run name {name!r}')
    names.add(name)
    runs.append(Run(name, overrides, os.path.join(workdir, name), int(config.training_steps)))
  return runs


# ------------------------------------------------------------------------------------------ run state
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
  return [python, train_script, f'--workdir={run.workdir}'] + _flag_args(config_path, run.overrides)


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
  status = 'diverged' if any(p in tail for p in _DIVERGED_PATTERNS) else 'failed'
  with open(os.path.join(run.workdir, FAILED_MARKER), 'w') as f:
    json.dump({'status': status, 'returncode': returncode, 'wall_s': wall_s, 'stderr_tail': tail}, f,
              indent=2)
  return RunResult(run, status, returncode, wall_s, tail)


def run_sweep(runs: Sequence[Run], config_path: str, parallel: int = 1, retry_failed: bool = False,
              python: str = sys.executable, train_script: str = TRAIN_SCRIPT, env: Optional[dict] = None,
              log=print) -> List[RunResult]:
  """Runs every unfinished run as a train.py subprocess, `parallel` at a time; returns one result per run.

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


# ------------------------------------------------------------------------------------------ summary
SUMMARY_METRICS = ('top1', 'top5', 'loss', 'ema_top1')


def summarize(runs: Sequence[Run]) -> List[dict]:
  """One row per run from its workdir: the swept values, status, final eval, last train metrics."""
  rows = []
  for run in runs:
    state = run_state(run)
    records = read_metrics(run.workdir)
    train = [r for r in records if r.get('kind') == 'train']
    final = _final_eval(records, run.training_steps)
    row = {'run': run.name, 'status': state.status}
    row.update(run.overrides)
    for k in SUMMARY_METRICS:
      row[k] = final.get(k) if final else None
    row['last_step'] = max((r.get('step', 0) for r in records), default=0)
    row['training_steps'] = run.training_steps
    row['train_loss'] = train[-1].get('loss') if train else None
    row['max_grad_norm'] = max((r.get('grad_norm', 0.0) for r in train), default=None)
    row['clip_fraction'] = train[-1].get('clip_fraction') if train else None
    ips = [r['images_per_sec'] for r in train if 'images_per_sec' in r]
    row['images_per_sec'] = sorted(ips)[len(ips) // 2] if ips else None
    row['returncode'] = state.returncode
    row['wall_s'] = state.wall_s if state.wall_s is not None else _done_wall_s(run.workdir)
    row['error'] = state.stderr_tail.splitlines()[-1] if state.stderr_tail else ''
    rows.append(row)
  return rows


def _done_wall_s(workdir: str) -> Optional[float]:
  path = os.path.join(workdir, DONE_MARKER)
  if os.path.exists(path):
    m = re.search(r'wall_s=([0-9.]+)', open(path).read())
    return float(m.group(1)) if m else None
  return None


def _columns(rows: Sequence[dict]) -> List[str]:
  cols = []
  for r in rows:
    cols.extend(k for k in r if k not in cols)
  return cols


def _fmt(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v).replace('|', '\\|').replace('\n', ' ')


def write_csv(path: str, rows: Sequence[dict]) -> None:
  cols = _columns(rows)
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in cols})


def markdown_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
  cols = list(columns or _columns(rows))
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(_fmt(r.get(c)) for c in cols) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def _as_float(v) -> Optional[float]:
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def plot_summary(path: str, rows: Sequence[dict], x: str, series: Optional[str] = None,
                 metric: str = 'top1', title: str = '') -> None:
  """Final `metric` vs field `x`, one line per value of `series` (and of any other swept field).

  Runs without a final eval (diverged, failed, pending) are drawn as red crosses on the x axis.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  xs_all = list(dict.fromkeys(r.get(x) for r in rows))
  numeric = all(_as_float(v) is not None for v in xs_all)
  pos = {v: (_as_float(v) if numeric else i) for i, v in enumerate(xs_all)}
  groups: Dict[str, List[dict]] = {}
  for r in rows:
    label = f'{series}={r.get(series)}' if series else 'all runs'
    groups.setdefault(label, []).append(r)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  failed_label = True
  for label, rs in groups.items():
    rs = sorted(rs, key=lambda r: pos[r.get(x)])
    ok = [(pos[r.get(x)], r[metric]) for r in rs if r.get(metric) is not None]
    if ok:
      ax.plot(*zip(*ok), marker='o', label=label)
    bad = [pos[r.get(x)] for r in rs if r.get(metric) is None]
    if bad:
      ax.plot(bad, [0.0] * len(bad), 'x', color='red', markersize=10, mew=2,
              label='no final eval (diverged / failed)' if failed_label else None)
      failed_label = False
  if numeric and all(p > 0 for p in pos.values()) and max(pos.values()) / min(pos.values()) >= 8:
    ax.set_xscale('log')
    ax.set_xticks(sorted(pos.values()))
    ax.set_xticklabels([str(v) for v in sorted(xs_all, key=lambda v: pos[v])])
  elif not numeric:
    ax.set_xticks(list(pos.values()))
    ax.set_xticklabels([str(v) for v in xs_all])
  ax.set_xlabel(x)
  ax.set_ylabel(f'final {metric}')
  ax.set_ylim(-0.03, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def default_plot_axes(runs: Sequence[Run]) -> (str, Optional[str]):
  """x: a swept 'clipping' field if any, else the first swept field; series: batch_size, else the next."""
  swept = [k for k in runs[0].overrides if len({r.overrides.get(k) for r in runs}) > 1] if runs else []
  if not swept:
    return (next(iter(runs[0].overrides), 'run') if runs else 'run'), None
  x = next((k for k in swept if 'clipping' in k), swept[0])
  rest = [k for k in swept if k != x]
  series = 'batch_size' if 'batch_size' in rest else (rest[0] if rest else None)
  return x, series


def write_summary(workdir: str, runs: Sequence[Run], x: Optional[str] = None,
                  series: Optional[str] = None, metric: str = 'top1') -> List[dict]:
  """Writes summary.csv, summary.md and summary.png in `workdir`; returns the rows."""
  rows = summarize(runs)
  os.makedirs(workdir, exist_ok=True)
  write_csv(os.path.join(workdir, 'summary.csv'), rows)
  counts = {s: sum(r['status'] == s for r in rows) for s in ('done', 'diverged', 'failed', 'pending')}
  with open(os.path.join(workdir, 'summary.md'), 'w') as f:
    f.write(f'# Sweep summary: {len(rows)} runs, ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n)
            + '\n\n')
    f.write(markdown_table(rows))
  dx, dseries = default_plot_axes(runs)
  x = x or dx
  series = series if series is not None else dseries
  plot_summary(os.path.join(workdir, 'summary.png'), rows, x, series, metric)
  return rows
