"""Sweep summaries: one row per run (swept values, status, final eval, last train metrics), written as
summary.csv, summary.md and summary.png in the sweep's workdir."""
import csv
import os
import re
from typing import Dict, List, Optional, Sequence

from research.sweep_grid import Run
from research.sweep_runs import DONE_MARKER, _final_eval, read_metrics, run_state

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
