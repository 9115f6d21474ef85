"""Sweep grids over `train.py` config overrides: axes, products, run names, and validation against the
config (an unknown field or an unparsable value fails before any run starts).

A sweep is a base config file plus a grid of `--config.<field>=<value>` overrides. Every grid point runs
`train.py` as its own subprocess in its own sub-workdir (`research.sweep_runs`), so a crash or a NaN in one
run cannot take down the others; `research.sweep_summary` collects the results. The command is
`python -m research.sweep`.

    runs = sweep_grid.make_runs('configs/demo.py', 'runs/sweep',
                                sweep_grid.grid(sweep_grid.axis('optimizer.agc.clipping', [0.01, 0.04]),
                                                sweep_grid.axis('batch_size', [256, 1024])))
    sweep_runs.run_sweep(runs, 'configs/demo.py', parallel=2)
    rows = sweep_summary.write_summary('runs/sweep', runs)
"""
import dataclasses
import itertools
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from absl import flags

from nfnets import config_validation
from nfnets import data
from nfnets import run_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
def flag_args(config_path: str, overrides: Mapping[str, str]) -> List[str]:
  return [f'--config={config_path}'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def resolve_config(config_path: str, overrides: Mapping[str, str] = None):
  """The config train.py would see for these overrides, parsed by the same flag machinery
  (`nfnets.run_config`: a recipe .py or a run's saved config.json).

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
  from configs import base  # pylint: disable=g-import-not-at-top  (after REPO_ROOT is on sys.path)
  argv = ['train.py'] + flag_args(config_path, overrides)
  fv = flags.FlagValues()
  run_config.define_config_flag(base.get_config, 'config', flag_values=fv, sys_argv=argv)
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


def training_steps(config) -> int:
  """The run length train.py will use: `training_steps`, or the one `epochs` gives on the config's data."""
  if config.training_steps is not None:
    return int(config.training_steps)
  return config_validation.resolve_training_steps(config, data.dataset_info(config.dataset).num_train_examples)


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
    runs.append(Run(name, overrides, os.path.join(workdir, name), training_steps(config)))
  return runs
