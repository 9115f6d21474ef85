"""Sweep config overrides over train.py runs, resumably, and summarise them.

    python -m research.sweep --config=configs/demo.py --workdir=runs/sweep \
        --sweep=optimizer.agc.clipping=0.01,0.02,0.04,0.08,0.16 --sweep=batch_size=256,1024 \
        [--parallel=2] [--config.training_steps=500 ...] [--print_commands] [--summary_only]

Each grid point trains in <workdir>/<field=value,...>/ as its own train.py process. Rerunning the same
command skips finished runs (and failed ones, unless --retry_failed). The sweep ends by writing
summary.csv, summary.md and summary.png (final top-1 vs lambda, one line per batch size) in the workdir.
While runs train, each one's newest step is logged every 30 s (its own console goes to its stderr.log).
With --print_commands it prints one shell line per unfinished run, for a cluster scheduler, and exits;
--summary_only then collects their results.
"""
import re
import sys

from absl import app
from absl import flags
from absl import logging

from nfnets import console

from research import sweep_grid
from research import sweep_runs
from research import sweep_summary

_CONFIG = flags.DEFINE_string('config', None, 'Base config file, e.g. configs/demo.py (or file.py:arg).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory; each run gets a sub-directory.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'FIELD=V1,V2,...; repeat for a grid (the last varies '
                                   'fastest).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'How many train.py processes run at once.')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print the command lines of unfinished runs and exit.')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False, 'Run nothing; write the summary of what is there.')
_RETRY = flags.DEFINE_bool('retry_failed', False, 'Rerun runs that failed or diverged before.')
_PLOT_X = flags.DEFINE_string('plot_x', None, 'Field on the x axis of summary.png (default: the swept '
                              '*clipping* field, else the first swept field).')
_PLOT_SERIES = flags.DEFINE_string('plot_series', None, 'One line per value of this field (default: '
                                   'batch_size when swept).')
_METRIC = flags.DEFINE_enum('metric', 'top1', list(sweep_summary.SUMMARY_METRICS), 'Metric plotted.')
flags.mark_flags_as_required(['config', 'workdir'])

_OVERRIDE = re.compile(r'^--config\.([^=]+)=(.*)$')


def split_overrides(argv):
  """Pulls `--config.<field>=<value>` (fixed for every run) out of argv, before absl sees them."""
  rest, fixed = [], {}
  for a in argv:
    m = _OVERRIDE.match(a)
    if m:
      fixed[m.group(1)] = m.group(2)
    else:
      rest.append(a)
  return rest, fixed


_FIXED = {}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  axes = [sweep_grid.parse_sweep_flag(s) for s in _SWEEP.value]
  runs = sweep_grid.make_runs(_CONFIG.value, _WORKDIR.value, sweep_grid.grid(*axes), fixed=_FIXED)
  if _PRINT.value:
    for run in runs:
      state = sweep_runs.run_state(run)
      if state.status == 'done' or (state.status != 'pending' and not _RETRY.value):
        print(f'# skip ({state.status}): {run.name}')
      else:
        print(sweep_runs.shell_command(run, _CONFIG.value))
    return 0
  if not _SUMMARY_ONLY.value:
    logging.info('[sweep] %d runs in %s, %d at a time; each run logs to its stderr.log', len(runs),
                 _WORKDIR.value, _PARALLEL.value)
    sweep_runs.run_sweep(runs, _CONFIG.value, parallel=_PARALLEL.value, retry_failed=_RETRY.value)
  rows = sweep_summary.write_summary(_WORKDIR.value, runs, x=_PLOT_X.value, series=_PLOT_SERIES.value,
                             metric=_METRIC.value)
  print(sweep_summary.markdown_table(rows, ['run', 'status', 'top1', 'ema_top1', 'last_step', 'wall_s', 'error']))
  print(f'[sweep] wrote {_WORKDIR.value}/summary.csv, summary.md, summary.png')
  return 0 if all(r['status'] == 'done' for r in rows) else 1


def cli():
  """The `nfnets-sweep` command (pyproject.toml); `python -m research.sweep` runs the same."""
  global _FIXED
  argv, _FIXED = split_overrides(sys.argv)
  console.run(main, (sweep_grid.SweepError,), argv=argv)


if __name__ == '__main__':
  cli()
