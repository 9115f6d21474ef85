"""The paper's AGC study (§4.1, Fig. 2) at CPU scale: batch size x learning rate x (no AGC | lambda).

    python -m research.agc_study --parallel=2 [--optimizer=sgd|adamw|lamb] \
        [--out_png=docs/agc_study.png] [--out_md=docs/agc_study.md]
    python -m research.agc_study --from_md=docs/agc_study.md --out_png=docs/agc_study.png   # redraw only

Every run is a `train.py` subprocess driven by `research.sweep_runs` (resumable: rerun to continue).
The LR follows the paper's linear rule, peak = base_lr * batch / 256, and every batch size trains for the
same number of epochs, so larger batches take fewer, larger steps, as in the paper.

`--optimizer` picks the optimizer AGC sits in front of, with its own default grid (`STUDY_DEFAULTS`): the
paper's SGD-Nesterov (App. A.1), or AdamW/LAMB with decoupled weight decay 0.05. The paper tunes
lambda for SGD only (§4.1: lambda = 0.01 for batch >= 1024). Adam-type optimizers divide each coordinate
by its running RMS, so a clip that scales every step alike changes nothing and only the steps clipped
harder than usual are damped; the AdamW grid goes up to lambda = 0.64 to see whether that calls for a
larger lambda (docs/agc_study_adamw.md: at this scale it does not).
`--from_md` redraws the figure from a table this module wrote, without the runs.
"""
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags

from nfnets import console

from research import sweep_grid
from research import sweep_runs
from research import sweep_summary
from research.agc_study_plot import AGC_OFF, cell_label, plot_study

CONFIG = os.path.join(sweep_grid.REPO_ROOT, 'configs', 'agc_study.py')
BATCH_SIZES = (64, 256, 1024)
BASE_LRS = (0.025, 0.1, 0.4)       # per 256 images (the paper's is 0.1)
CLIPPINGS = (0.01, 0.04, 0.16)     # lambda; None in a grid = AGC off
EPOCHS = 30.0
# Per optimizer: the default base LRs (per 256 images), lambdas and fixed config overrides. sgd adds no
# override, so its runs are the config's (the existing study's run directories resume). For adamw/lamb,
# weight decay is optax's decoupled kind, scaled by the LR schedule (p -= lr * wd * p): 0.05 is a common
# AdamW value for convnets; over 30 epochs here the total shrink is exp(-wd * sum(lr)),
# sum(lr) ~ 84 * base_lr, i.e. ~4% at base LR 1e-2.
STUDY_DEFAULTS = {
    'sgd': dict(base_lrs=BASE_LRS, clippings=CLIPPINGS, fixed={}),
    # docs/agc_study_adamw.md also has base LR 3e-4 (90-92% whatever lambda); without it, 36 runs.
    'adamw': dict(base_lrs=(1e-3, 3e-3, 1e-2), clippings=(0.01, 0.16, 0.64),
                  fixed={'optimizer.name': 'adamw', 'optimizer.weight_decay': '0.05'}),
    'lamb': dict(base_lrs=(1e-3, 3e-3, 1e-2), clippings=(0.01, 0.16, 0.64),   # not run yet
                 fixed={'optimizer.name': 'lamb', 'optimizer.weight_decay': '0.05'}),
}


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


def study_table(rows: Sequence[dict]) -> str:
  """Markdown: one line per (base LR, batch), one column per AGC setting; test top-1 % or NaN@step."""
  agcs = list(dict.fromkeys(r['agc'] for r in rows))
  keys = list(dict.fromkeys((r['base_lr'], r['batch']) for r in rows))
  by = {(r['base_lr'], r['batch'], r['agc']): r for r in rows}
  head = ['base LR', 'batch', 'peak LR', 'steps'] + [_column(a) for a in agcs]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for lr, b in keys:
    any_row = next(by[(lr, b, a)] for a in agcs if (lr, b, a) in by)
    cells = [cell_label(by[(lr, b, a)]) if (lr, b, a) in by else '' for a in agcs]
    lines.append('| ' + ' | '.join([f'{lr:g}', str(b), f'{lr * b / 256:g}', str(any_row['training_steps'])]
                                   + cells) + ' |')
  return '\n'.join(lines) + '\n'


def _column(agc: str) -> str:
  return 'no AGC' if agc == AGC_OFF else f'λ={agc}'


def parse_table(md: str) -> List[dict]:
  """The rows behind a `study_table` (base_lr, batch, peak_lr, training_steps, agc, status, top1,
  diverged_at), read back from the markdown, so the figure can be redrawn without the run directories."""
  lines = [l.strip() for l in md.splitlines() if l.strip().startswith('|')]
  if len(lines) < 3 or not lines[0].startswith('| base LR | batch | peak LR | steps |'):
    raise sweep_grid.SweepError('No AGC-study table (| base LR | batch | peak LR | steps | ...) found')
  split = lambda l: [c.strip() for c in l.strip('|').split('|')]
  agcs = []
  for col in split(lines[0])[4:]:
    if col == 'no AGC':
      agcs.append(AGC_OFF)
    elif col.startswith('λ='):
      agcs.append(col[2:])
    else:
      raise sweep_grid.SweepError(f'Unknown AGC column {col!r}')
  rows = []
  for line in lines[2:]:
    cells = split(line)
    if len(cells) != 4 + len(agcs):
      raise sweep_grid.SweepError(f'Table line has {len(cells)} cells, expected {4 + len(agcs)}: {line}')
    lr, batch, peak, steps = float(cells[0]), int(cells[1]), float(cells[2]), int(cells[3])
    for agc, cell in zip(agcs, cells[4:]):
      if not cell:
        continue
      row = dict(base_lr=lr, batch=batch, peak_lr=peak, training_steps=steps, agc=agc, top1=None,
                 diverged_at=None)
      m = re.fullmatch(r'NaN(?:@(\d+))?', cell)
      if m:
        row.update(status='diverged', diverged_at=int(m.group(1)) if m.group(1) else None)
      elif re.fullmatch(r'\d+(\.\d*)?', cell):
        row.update(status='done', top1=float(cell) / 100)
      else:
        row.update(status=cell)
      rows.append(row)
  return rows


def md_title(md: str) -> str:
  """The title line of a study's markdown (before '; test top-1')."""
  return md.splitlines()[0].split('; test top-1')[0].strip() if md.strip() else ''


def describe_optimizer(o) -> str:
  """'SGD-Nesterov, L2 5e-05' or 'AdamW, decoupled weight decay 0.05' from a config's `optimizer` block."""
  name = o.get('name', 'sgd')
  if name == 'sgd':
    momentum = ('Nesterov' if o.nesterov else f'momentum {o.momentum:g}') if o.momentum else 'no momentum'
    return f'SGD-{momentum}, L2 {o.weight_decay:g}'
  return f"{'AdamW' if name == 'adamw' else 'LAMB'}, decoupled weight decay {o.weight_decay:g}"


def _run_wall_s(run: sweep_grid.Run) -> float:
  """The run's own wall time, from its DONE or FAILED marker (0 if unknown)."""
  state = sweep_runs.run_state(run)
  if state.wall_s is not None:
    return state.wall_s
  done = os.path.join(run.workdir, sweep_runs.DONE_MARKER)
  if os.path.exists(done):
    m = re.search(r'wall_s=([\d.]+)', open(done).read())
    return float(m.group(1)) if m else 0.0
  return 0.0


def _add_wall_time(workdir: str, seconds: float) -> float:
  """Adds `seconds` to the study's wall time kept in `workdir`/wall_time.txt (so a rerun that only
  rewrites the table keeps it); returns the total."""
  path = os.path.join(workdir, 'wall_time.txt')
  total = float(open(path).read()) if os.path.exists(path) else 0.0
  with open(path, 'w') as f:
    f.write(f'{total + seconds:.1f}\n')
  return total + seconds


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
              retry_failed: bool = False, command: Optional[str] = None, **study_kwargs) -> List[dict]:
  """Runs (or resumes) the study, then writes the sweep summary plus agc_study.md/.png in `workdir`.

  `command` (the command line, if given) is written under the table."""
  t0 = time.time()
  runs = make_study(workdir, **study_kwargs)
  results = sweep_runs.run_sweep(runs, study_kwargs.get('config_path', CONFIG), parallel=parallel,
                                 retry_failed=retry_failed)
  wall = _add_wall_time(workdir, time.time() - t0 if any(not r.skipped for r in results) else 0.0)
  sweep_summary.write_summary(workdir, runs, x='optimizer.base_lr', series='batch_size')
  rows = study_rows(runs)
  config = sweep_grid.resolve_config(study_kwargs.get('config_path', CONFIG), study_kwargs.get('fixed'))
  title = (f'AGC study, {describe_optimizer(config.optimizer)}, {describe_model(config.model)}, on digits '
           '(top-1 on the 360 test images)')
  table = study_table(rows)
  run_wall = sum(_run_wall_s(r) for r in runs)
  md = (f'{title}; test top-1 %, NaN@k: the loss became NaN/Inf at step k.\n\n{table}\n'
        f'Sweep wall time: {wall / 60:.1f} min at --parallel={parallel} ({sum(r["status"] == "done" for r in rows)} runs finished, '
        f'{sum(r["status"] == "diverged" for r in rows)} diverged, '
        f'{sum(r["status"] == "failed" for r in rows)} failed; the runs\' own wall times sum to '
        f'{run_wall / 60:.1f} min).\n' + (f'\nCommand: `{command}`\n' if command else ''))
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
  global _OPTIMIZER, _FROM_MD
  _OPTIMIZER = flags.DEFINE_enum('optimizer', 'sgd', list(STUDY_DEFAULTS),
                                 'The optimizer behind AGC; picks the default grid and overrides.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Study directory (one sub-directory per run); default '
                                 'runs/agc_study, runs/agc_study_<optimizer> for adamw/lamb.')
  _PARALLEL = flags.DEFINE_integer('parallel', 2, 'train.py processes at once.')
  _BATCH = flags.DEFINE_list('batch_sizes', [str(b) for b in BATCH_SIZES], 'Batch sizes.')
  _LRS = flags.DEFINE_list('base_lrs', None, "Base LRs per 256 images (default: the optimizer's).")
  _CLIP = flags.DEFINE_list('clippings', None, "AGC lambdas, plus a no-AGC run (default: the optimizer's).")
  _FROM_MD = flags.DEFINE_string('from_md', None, 'Redraw --out_png from this study table (no runs).')
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
  defaults = STUDY_DEFAULTS[_OPTIMIZER.value]
  fixed = dict(defaults['fixed'])
  if _MODEL.value:
    fixed['model.name'] = _MODEL.value
  try:
    if _FROM_MD.value:
      if not _OUT_PNG.value:
        raise sweep_grid.SweepError('--from_md needs --out_png')
      with open(_FROM_MD.value) as f:
        md = f.read()
      plot_study(_OUT_PNG.value, parse_table(md), md_title(md))
      print(f'agc_study: wrote {_OUT_PNG.value} from {_FROM_MD.value}')
      return 0
    for item in _SET.value:
      field, sep, value = item.partition('=')
      if not sep or not field:
        raise sweep_grid.SweepError(f'--set takes field=value, got {item!r}')
      fixed[field.strip()] = value.strip()
    workdir = _WORKDIR.value or ('runs/agc_study' if _OPTIMIZER.value == 'sgd'
                                 else f'runs/agc_study_{_OPTIMIZER.value}')
    run_study(workdir, _PARALLEL.value, _OUT_PNG.value, _OUT_MD.value, _RETRY.value,
              command=' '.join(['python -m research.agc_study'] + sys.argv[1:]),
              batch_sizes=[int(b) for b in _BATCH.value],
              base_lrs=[float(x) for x in _LRS.value] if _LRS.value else defaults['base_lrs'],
              clippings=[float(x) for x in _CLIP.value] if _CLIP.value else defaults['clippings'],
              epochs=_EPOCHS.value, fixed=fixed or None)
  except (sweep_grid.SweepError, OSError) as e:
    return console.user_error(e)
  return 0


if __name__ == '__main__':
  define_flags()
  console.run(main)   # the project's console: the sweep's progress lines show
