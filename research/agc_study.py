"""The paper's AGC study (§4.1, Fig. 2) at CPU scale: batch size x learning rate x (no AGC | lambda).

    python -m research.agc_study --workdir=runs/agc_study --parallel=2 \
        [--out_png=docs/agc_study.png] [--out_md=docs/agc_study.md]

Every run is a `train.py` subprocess driven by `research.sweep_runs` (resumable: rerun to continue).
The LR follows the paper's linear rule, peak = base_lr * batch / 256, and every batch size trains for the
same number of epochs, so larger batches take fewer, larger steps, as in the paper.
"""
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags

from research import sweep_grid
from research import sweep_runs
from research import sweep_summary

CONFIG = os.path.join(sweep_grid.REPO_ROOT, 'configs', 'agc_study.py')
BATCH_SIZES = (64, 256, 1024)
BASE_LRS = (0.025, 0.1, 0.4)       # per 256 images (the paper's is 0.1)
CLIPPINGS = (0.01, 0.04, 0.16)     # lambda; None in a grid = AGC off
EPOCHS = 30.0
AGC_OFF = 'off'


def agc_axis(clippings: Sequence[float]) -> List[sweep_grid.Overrides]:
  """No AGC, then AGC at each lambda."""
  return ([{'optimizer.agc.enabled': 'False'}] +
          [{'optimizer.agc.enabled': 'True', 'optimizer.agc.clipping': sweep_grid.format_value(c)}
           for c in clippings])


def batch_axis(batch_sizes: Sequence[int], epochs: float, num_train_examples: int) -> List[sweep_grid.Overrides]:
  """Each batch size with the step count that gives `epochs` passes over the data."""
  return [{'batch_size': str(b), 'training_steps': str(max(1, round(epochs * num_train_examples / b)))}
          for b in batch_sizes]


def num_train_examples(config_path: str = CONFIG) -> int:
  from nfnets import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.dataset_info(sweep_grid.resolve_config(config_path).dataset).num_train_examples


def make_study(workdir: str, batch_sizes=BATCH_SIZES, base_lrs=BASE_LRS, clippings=CLIPPINGS,
               epochs: float = EPOCHS, config_path: str = CONFIG,
               fixed: Optional[Dict[str, str]] = None, train_examples: Optional[int] = None
               ) -> List[sweep_grid.Run]:
  """The study's runs: base_lr x batch size x (AGC off | lambda), validated against the config.

  `train_examples` (for the epoch -> step conversion) is read from the dataset when not given.
  """
  n = train_examples or num_train_examples(config_path)
  points = sweep_grid.grid([{'optimizer.base_lr': sweep_grid.format_value(lr)} for lr in base_lrs],
                      batch_axis(batch_sizes, epochs, n), agc_axis(clippings))
  runs = sweep_grid.make_runs(config_path, workdir, points, fixed=fixed)
  # Short names: 'lr=0.4,bs=1024,agc=0.01'.
  return [sweep_grid.Run(_short_name(r.overrides), r.overrides, os.path.join(workdir, _short_name(r.overrides)),
                    r.training_steps) for r in runs]


def _agc_label(overrides: Dict[str, str]) -> str:
  if overrides.get('optimizer.agc.enabled') == 'False':
    return AGC_OFF
  return overrides.get('optimizer.agc.clipping', '?')


def _short_name(o: Dict[str, str]) -> str:
  return f"lr={o['optimizer.base_lr']},bs={o['batch_size']},agc={_agc_label(o)}"


def _diverged_step(row: dict) -> Optional[int]:
  m = re.search(r'NaN/Inf at step (\d+)', row.get('error') or '')
  return int(m.group(1)) if m else None


def study_rows(runs: Sequence[sweep_grid.Run]) -> List[dict]:
  rows = sweep_summary.summarize(runs)
  for row, run in zip(rows, runs):
    o = run.overrides
    row['base_lr'] = float(o['optimizer.base_lr'])
    row['batch'] = int(o['batch_size'])
    row['peak_lr'] = row['base_lr'] * row['batch'] / 256
    row['agc'] = _agc_label(o)
    row['diverged_at'] = _diverged_step(row)
  return rows


def _cell(row: dict) -> str:
  if row['status'] == 'done':
    return f"{100 * row['top1']:.1f}"
  if row['status'] == 'diverged':
    step = row['diverged_at']
    return f'NaN@{step}' if step is not None else 'NaN'
  return row['status']


def study_table(rows: Sequence[dict]) -> str:
  """Markdown: one line per (base LR, batch), one column per AGC setting; test top-1 % or NaN@step."""
  agcs = list(dict.fromkeys(r['agc'] for r in rows))
  keys = list(dict.fromkeys((r['base_lr'], r['batch']) for r in rows))
  by = {(r['base_lr'], r['batch'], r['agc']): r for r in rows}
  head = ['base LR', 'batch', 'peak LR', 'steps'] + [('no AGC' if a == AGC_OFF else f'λ={a}') for a in agcs]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for lr, b in keys:
    any_row = next(by[(lr, b, a)] for a in agcs if (lr, b, a) in by)
    cells = [_cell(by[(lr, b, a)]) if (lr, b, a) in by else '' for a in agcs]
    lines.append('| ' + ' | '.join([f'{lr:g}', str(b), f'{lr * b / 256:g}', str(any_row['training_steps'])]
                                   + cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot_study(path: str, rows: Sequence[dict], title: str = '') -> None:
  """(a) top-1 vs batch size, one line per AGC setting and base LR; (b) top-1 vs lambda per batch size.

  Diverged runs (NaN loss) are drawn as crosses at 0.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  agcs = list(dict.fromkeys(r['agc'] for r in rows))
  lrs = sorted({r['base_lr'] for r in rows})
  batches = sorted({r['batch'] for r in rows})
  colors = dict(zip(agcs, ['black', 'tab:blue', 'tab:orange', 'tab:green', 'tab:purple', 'tab:brown']))
  styles = dict(zip(lrs, ['--', '-', ':', '-.']))
  acc = lambda r: r['top1'] if r['status'] == 'done' else None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
  for lr in lrs:
    for a in agcs:
      rs = sorted((r for r in rows if r['base_lr'] == lr and r['agc'] == a), key=lambda r: r['batch'])
      ok = [(r['batch'], acc(r)) for r in rs if acc(r) is not None]
      label = f"{'no AGC' if a == AGC_OFF else f'λ={a}'}, base LR {lr:g}"
      if ok:
        ax1.plot(*zip(*ok), styles[lr], marker='o', color=colors[a], label=label)
      bad = [r['batch'] for r in rs if acc(r) is None]
      if bad:
        ax1.plot(bad, [0] * len(bad), 'x', color=colors[a], markersize=9, mew=2,
                 label=None if ok else label + ' (all NaN)')
  ax1.set_xscale('log', base=2)
  ax1.set_xticks(batches)
  ax1.set_xticklabels([str(b) for b in batches])
  ax1.set_xlabel('batch size (peak LR = base LR x batch / 256)')
  ax1.set_ylabel('test top-1 (x at 0: loss became NaN)')
  ax1.set_ylim(-0.04, 1.02)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7, loc='lower left')
  ax1.set_title('(a) accuracy vs batch size', fontsize=10)

  pos = {a: i for i, a in enumerate(agcs)}
  for lr in lrs:
    for i, b in enumerate(batches):
      rs = sorted((r for r in rows if r['base_lr'] == lr and r['batch'] == b), key=lambda r: pos[r['agc']])
      ok = [(pos[r['agc']], acc(r)) for r in rs if acc(r) is not None and r['agc'] != AGC_OFF]
      color = plt.cm.viridis(i / max(1, len(batches) - 1))
      if ok:
        ax2.plot(*zip(*ok), styles[lr], marker='o', color=color, label=f'batch {b}, base LR {lr:g}')
      for r in rs:
        if r['agc'] == AGC_OFF and acc(r) is not None:
          ax2.plot([pos[AGC_OFF]], [acc(r)], 's', color=color, markerfacecolor='none')
      bad = [pos[r['agc']] for r in rs if acc(r) is None]
      if bad:
        ax2.plot(bad, [0] * len(bad), 'x', color=color, markersize=9, mew=2)
  ax2.set_xticks(list(pos.values()))
  ax2.set_xticklabels(['no AGC' if a == AGC_OFF else f'λ={a}' for a in agcs])
  ax2.set_ylim(-0.04, 1.02)
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=7, loc='lower right')
  ax2.set_title('(b) sensitivity to λ (squares: no AGC; x: NaN)', fontsize=10)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def describe_model(m) -> str:
  """'nf_resnet26 (depths 1-1-1-1, width 1, skip gains at init 1)' from a config's `model` block."""
  extra = []
  if m.get('depths') is not None:
    extra.append('depths ' + '-'.join(str(d) for d in m.depths))
  if m.get('width') is not None:
    extra.append(f'width {m.width:g}')
  if m.get('skip_gain_init', 0.0) != 0.0:
    extra.append(f'skip gains at init {m.skip_gain_init:g}')
  return m.name + (f" ({', '.join(extra)})" if extra else '')


def run_study(workdir: str, parallel: int = 1, out_png: Optional[str] = None, out_md: Optional[str] = None,
              retry_failed: bool = False, **study_kwargs) -> List[dict]:
  """Runs (or resumes) the study, then writes the sweep summary plus agc_study.md/.png in `workdir`."""
  t0 = time.time()
  runs = make_study(workdir, **study_kwargs)
  sweep_runs.run_sweep(runs, CONFIG if 'config_path' not in study_kwargs else study_kwargs['config_path'],
                  parallel=parallel, retry_failed=retry_failed)
  wall = time.time() - t0
  sweep_summary.write_summary(workdir, runs, x='optimizer.base_lr', series='batch_size')
  rows = study_rows(runs)
  model = describe_model(sweep_grid.resolve_config(study_kwargs.get('config_path', CONFIG),
                                              study_kwargs.get('fixed')).model)
  title = f'AGC study, {model}, on digits (top-1 on the 360 test images)'
  table = study_table(rows)
  md = (f'{title}; test top-1 %, NaN@k: the loss became NaN/Inf at step k.\n\n{table}\n'
        f'Sweep wall time: {wall / 60:.1f} min ({sum(r["status"] == "done" for r in rows)} runs finished, '
        f'{sum(r["status"] == "diverged" for r in rows)} diverged, '
        f'{sum(r["status"] == "failed" for r in rows)} failed).\n')
  for path in [os.path.join(workdir, 'agc_study.md')] + ([out_md] if out_md else []):
    with open(path, 'w') as f:
      f.write(md)
  for path in [os.path.join(workdir, 'agc_study.png')] + ([out_png] if out_png else []):
    plot_study(path, rows, title)
  print(md)
  return rows


def define_flags():
  """The command-line flags (defined only when run as a program, so imports do not clash)."""
  global _WORKDIR, _PARALLEL, _BATCH, _LRS, _CLIP, _EPOCHS, _MODEL, _OUT_PNG, _OUT_MD, _RETRY, _SET
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/agc_study', 'Study directory (one sub-directory per run).')
  _PARALLEL = flags.DEFINE_integer('parallel', 2, 'train.py processes at once.')
  _BATCH = flags.DEFINE_list('batch_sizes', [str(b) for b in BATCH_SIZES], 'Batch sizes.')
  _LRS = flags.DEFINE_list('base_lrs', [str(x) for x in BASE_LRS], 'Base LRs per 256 images.')
  _CLIP = flags.DEFINE_list('clippings', [str(x) for x in CLIPPINGS], 'AGC lambdas (plus a no-AGC run).')
  _EPOCHS = flags.DEFINE_float('epochs', EPOCHS, 'Epochs per run, whatever the batch size.')
  _MODEL = flags.DEFINE_string('model', None, 'Registry model name (default: the config\'s).')
  _OUT_PNG = flags.DEFINE_string('out_png', None, 'Also write the plot here (e.g. docs/agc_study.png).')
  _OUT_MD = flags.DEFINE_string('out_md', None, 'Also write the table here.')
  _RETRY = flags.DEFINE_bool('retry_failed', False, 'Rerun failed or diverged runs.')
  _SET = flags.DEFINE_multi_string('set', [], 'field=value: a config override for every run, e.g. '
                                   '--set=model.skip_gain_init=0 (repeatable).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  fixed = {'model.name': _MODEL.value} if _MODEL.value else {}
  try:
    for item in _SET.value:
      field, sep, value = item.partition('=')
      if not sep or not field:
        raise sweep_grid.SweepError(f'--set takes field=value, got {item!r}')
      fixed[field.strip()] = value.strip()
    run_study(_WORKDIR.value, _PARALLEL.value, _OUT_PNG.value, _OUT_MD.value, _RETRY.value,
              batch_sizes=[int(b) for b in _BATCH.value], base_lrs=[float(x) for x in _LRS.value],
              clippings=[float(x) for x in _CLIP.value], epochs=_EPOCHS.value, fixed=fixed or None)
  except sweep_grid.SweepError as e:
    print(f'agc_study: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
