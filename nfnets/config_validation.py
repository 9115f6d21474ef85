"""Checks a whole run config up front, before any image is read or anything compiles.

`validate(config)` checks every field of configs/base.py that can hold a bad value, the data's class count
against `model.num_classes`, `init_from` and (given the process and device counts) the batch layout, and
raises one `ConfigError` listing every problem, one line each, naming the field, its value and what is
accepted: `optimizer.base_lr=-1.0 must be > 0`. train.py prints the lines as `error: ...` and exits with 2.

`resolve_training_steps` derives the run length from `epochs` when `training_steps` is None;
`check_batch_layout`, the one divisibility rule for global batches, lives in nfnets/batch_layout.py (shared
with the input pipeline) and is re-exported here.
"""
import difflib
import math
import numbers
import os
from typing import List, Optional

from nfnets import conv, optim, registry
from nfnets.cpu import tuning
# Re-exported: every check here raises ConfigError, and callers take the batch rule from this module too.
from nfnets.batch_layout import ConfigError, check_batch_layout  # pylint: disable=unused-import
from nfnets.data import info as info_lib
from nfnets.data.randaugment import RA_OPS

DTYPES = ('float32', 'bfloat16', 'float16')
BUILTIN_DATASETS = ('digits', 'fake', 'folder', 'imagenet2012')
DIGITS_SPLITS = ('train', 'test')
MAX_RA_MAGNITUDE = 30     # levels are magnitude / 10; the NFNet variants use 5..15 (nfnet.VARIANTS)
NUM_STAGES = 4            # every NFNet and NF-ResNet (nfnet.VARIANTS, nf_resnet.DEPTHS) has four stages
WEIGHT_SUFFIXES = 'released F*_haiku.npz, a flat .npz, a timm .safetensors/.pth'

_MISSING = object()


def resolve_training_steps(config, num_train_examples: int) -> int:
  """The run's optimizer steps: `training_steps` when set, else num_train_examples * epochs // batch_size,
  the reference code's rule (ImageNet, 360 epochs, batch 4096: 1281167 * 360 // 4096 = 112,602 steps), so
  changing batch_size keeps the number of epochs."""
  steps = config.get('training_steps')
  if steps is not None:
    return int(steps)
  epochs = config.get('epochs')
  if epochs is None:
    raise ConfigError('training_steps=None and epochs=None: set one of them (epochs decides when '
                      'training_steps is None)')
  steps = int(num_train_examples * epochs // config.batch_size)
  if steps < 1:
    raise ConfigError(f'epochs={epochs!r} of {num_train_examples} examples at batch_size={config.batch_size} '
                      f'is {steps} steps; must be >= 1 (raise epochs or set training_steps)')
  return steps


def fit_batch_to_data(config, num_train_examples: int, process_count: int, local_devices: int) -> Optional[int]:
  """For a config with `fit_batch_to_data`: lowers `batch_size` to the train split's size, rounded down to
  a multiple of processes x local devices x grad_accum_steps, when the split is smaller; returns the new
  batch size (None when nothing changed). `epochs` and `optimizer.warmup_epochs` then count steps of it."""
  bs, accum = config.get('batch_size'), config.get('grad_accum_steps')
  if not (config.get('fit_batch_to_data') and _is_int(bs) and _is_int(accum) and accum >= 1):
    return None
  div = process_count * local_devices * accum
  fitted = max(div, num_train_examples // div * div)
  if bs <= num_train_examples or fitted >= bs:
    return None
  config.batch_size = fitted
  return fitted


# ------------------------------------------------------------------------------------------ field rules

def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_min(lo):
  return lambda v: _is_int(v) and v >= lo, f'must be an integer >= {lo}'


def _above(lo):
  return lambda v: _is_num(v) and v > lo, f'must be > {lo:g}'


def _at_least(lo):
  return lambda v: _is_num(v) and v >= lo, f'must be >= {lo:g}'


def _unit(hi_closed: bool, lo_closed: bool = True):
  lo_ok = (lambda v: v >= 0) if lo_closed else (lambda v: v > 0)
  hi_ok = (lambda v: v <= 1) if hi_closed else (lambda v: v < 1)
  text = f'must be in {"[" if lo_closed else "("}0, 1{"]" if hi_closed else ")"}'
  return lambda v: _is_num(v) and lo_ok(v) and hi_ok(v), text


def _one_of(options):
  return lambda v: v in options, 'must be one of ' + ', '.join(map(repr, options))


_BOOL = (lambda v: isinstance(v, bool), 'must be True or False')
_FINITE = (_is_num, 'must be a finite number')
_NAME = (lambda v: isinstance(v, str) and bool(v), 'must be a non-empty string')


def _rules():
  """(field, (test, requirement), None allowed) for every plain field of configs/base.py."""
  return [
      ('batch_size', _int_min(1), False),
      ('grad_accum_steps', _int_min(1), False),
      ('training_steps', _int_min(1), True),        # None: derived from epochs
      ('epochs', _above(0), True),                  # checked for presence below
      ('dtype', _one_of(DTYPES), False),
      ('seed', _int_min(0), False),
      ('label_smoothing', _unit(hi_closed=False), False),
      ('ema_decay', _unit(hi_closed=True), False),
      ('log_every', _int_min(1), False),
      ('eval_every', _int_min(0), False),           # 0: evaluate only at the end
      ('checkpoint_every', _int_min(1), False),
      ('keep_checkpoints', _int_min(1), False),
      ('eval_batch_size', _int_min(1), False),
      ('remat', _BOOL, False),
      ('finetune', _BOOL, False),
      ('fit_batch_to_data', _BOOL, False),
      ('cpu_memory_scheduler', _BOOL, False),
      ('compilation_cache_dir', (lambda v: isinstance(v, str), "must be a folder path, or '' for none"),
       False),
      ('model.num_classes', _int_min(1), False),
      ('model.drop_rate', _unit(hi_closed=False), True),
      ('model.stochdepth_rate', _unit(hi_closed=False), False),
      ('model.width', _above(0), True),
      ('model.skip_gain_init', _FINITE, False),
      ('model.conv_impl', _one_of(conv.IMPLS), False),
      ('optimizer.base_lr', _above(0), False),
      ('optimizer.scale_by_batch', _BOOL, False),
      ('optimizer.momentum', _unit(hi_closed=False), False),
      ('optimizer.nesterov', _BOOL, False),
      ('optimizer.weight_decay', _at_least(0), False),
      ('optimizer.warmup_epochs', _at_least(0), False),
      ('optimizer.min_lr', _at_least(0), False),
      ('optimizer.b1', _unit(hi_closed=False), False),
      ('optimizer.b2', _unit(hi_closed=False), False),
      ('optimizer.eps', _above(0), False),
      ('optimizer.sam_rho', _at_least(0), False),
      ('optimizer.sam_batch_fraction', _unit(hi_closed=True, lo_closed=False), False),
      ('optimizer.agc.enabled', _BOOL, False),
      ('dataset.name', _NAME, False),
      ('dataset.train_split', _NAME, False),
      ('dataset.eval_split', _NAME, False),
      ('dataset.image_size', _int_min(1), True),
      ('dataset.eval_image_size', _int_min(1), True),
      ('dataset.eval_resize_pad', _int_min(0), True),   # None: the reference's crop ratio
      ('dataset.folder_eval_fraction', _unit(hi_closed=False), False),
      ('dataset.num_workers', _int_min(0), False),
      ('dataset.num_threads', _int_min(1), True),       # None: from the core count
      ('dataset.exact_resume', _BOOL, True),            # deprecated, ignored
      ('dataset.augment.random_crop', _BOOL, False),
      ('dataset.augment.crop_area_min', _unit(hi_closed=True, lo_closed=False), False),
      ('dataset.augment.random_flip', _BOOL, False),
      ('dataset.augment.mixup_alpha', _at_least(0), False),
      ('dataset.augment.cutmix', _BOOL, False),
      ('dataset.augment.randaugment', _BOOL, False),
      ('dataset.augment.ra_layers', _int_min(0), True),
      ('dataset.augment.ra_magnitude',
       (lambda v: _is_num(v) and 0 <= v <= MAX_RA_MAGNITUDE, f'must be in [0, {MAX_RA_MAGNITUDE}]'), True),
  ]


def _get(config, path: str):
  node = config
  for key in path.split('.'):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _suggest(value, options) -> str:
  close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''


def _check_fields(config, problems: List[str]) -> None:
  for path, (test, requirement), optional in _rules():
    value = _get(config, path)
    if value is _MISSING or (optional and value is None):
      continue
    if not test(value):
      problems.append(f'{path}={value!r} {requirement}')

  opt_name, opt_names = _get(config, 'optimizer.name'), getattr(optim, 'OPTIMIZERS', None)
  if opt_name is not _MISSING and opt_names and opt_name not in opt_names:
    problems.append(f'optimizer.name={opt_name!r} must be one of {", ".join(map(repr, opt_names))}')
  name = _get(config, 'model.name')
  if name not in registry.MODELS:
    problems.append(f'model.name={name!r} is not a registered model{_suggest(name, registry.MODELS)}; '
                    f'accepted: {", ".join(sorted(registry.MODELS))}')
  depths = _get(config, 'model.depths')
  if depths is not None and depths is not _MISSING and not (
      isinstance(depths, (tuple, list)) and len(depths) == NUM_STAGES
      and all(_is_int(d) and d >= 1 for d in depths)):
    problems.append(f'model.depths={depths!r} must be None or {NUM_STAGES} integers >= 1 (blocks per stage)')
  if _get(config, 'training_steps') is None and _get(config, 'epochs') is None:
    problems.append('epochs=None with training_steps=None: set one of them (epochs decides when '
                    'training_steps is None)')
  if _get(config, 'optimizer.agc.enabled') is True:
    for field in ('clipping', 'eps'):
      value = _get(config, f'optimizer.agc.{field}')
      if value is not _MISSING and not (_is_num(value) and value > 0):
        problems.append(f'optimizer.agc.{field}={value!r} must be > 0 when optimizer.agc.enabled=True')


# ------------------------------------------------------------------------------------------ data

def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def _tfds_name_known(name: str, data_dir: Optional[str]) -> bool:
  # TFDS (and TensorFlow under it) is heavy and optional: imported only when a TFDS name is checked.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.builder(name, data_dir=data_dir)   # registered in code, or prepared in data_dir: offline
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


def _check_dataset(config, problems: List[str]):
  """The data's DatasetInfo, or None when it is unknown (bad fields, or a TFDS community dataset)."""
  ds = config.dataset
  name, data_dir = ds.get('name'), ds.get('data_dir')
  before = len(problems)
  if not isinstance(name, str) or not name:
    return None                              # reported by the field rules
  if name == 'fake':
    return info_lib.dataset_info(ds)
  remote = isinstance(data_dir, str) and '://' in data_dir
  if name == 'digits':
    for field in ('train_split', 'eval_split'):
      if ds.get(field) not in DIGITS_SPLITS:
        accepted = ', '.join(map(repr, DIGITS_SPLITS))
        problems.append(f'dataset.{field}={ds.get(field)!r} must be one of {accepted} '
                        "for dataset.name='digits'")
  elif name == 'folder':
    if not data_dir:
      problems.append(f"dataset.data_dir={data_dir!r} must be set for dataset.name='folder': a folder of "
                      'class subfolders (<data_dir>/<class>/*.jpg, or <data_dir>/train/<class>/*)')
    elif not remote and not os.path.isdir(data_dir):
      problems.append(f"dataset.data_dir={data_dir!r} does not exist; dataset.name='folder' needs a folder "
                      'of class subfolders (<data_dir>/<class>/*.jpg, or <data_dir>/train/<class>/*)')
  else:                                      # a TFDS name
    if data_dir and not remote and not os.path.isdir(data_dir):
      problems.append(f'dataset.data_dir={data_dir!r} does not exist (the TFDS data_dir of {name!r})')
    if ':' in name or remote:                # a community namespace or remote data: not checkable offline
      return None
    if len(problems) == before and not _tfds_name_known(name, data_dir):
      problems.append(f'dataset.name={name!r} is not a known dataset{_suggest(name, BUILTIN_DATASETS)}; '
                      f'accepted: {", ".join(map(repr, BUILTIN_DATASETS))} or a TFDS image classification '
                      'dataset name (tfds.list_builders())')
  if len(problems) > before:
    return None
  try:
    return info_lib.dataset_info(ds)
  except (ValueError, FileNotFoundError) as e:
    field = f'dataset.data_dir={data_dir!r}' if name == 'folder' else f'dataset.name={name!r}'
    problems.append(f'{field}: {_one_line(e)}')
    return None


def _check_classes(config, info, problems: List[str]) -> None:
  num_classes = _get(config, 'model.num_classes')
  if info is None or config.dataset.name == 'fake' or not _is_int(num_classes) or num_classes < 1:
    return                 # fake data draws its labels from model.num_classes
  if info.num_classes == num_classes:
    return
  where = f'dataset {config.dataset.name!r}' + (
      f' in {config.dataset.data_dir!r}' if config.dataset.get('data_dir') else '')
  if config.get('init_from'):
    advice = (f'fine-tuning from init_from: set --config.model.num_classes={info.num_classes} (the '
              'classifier is re-initialised automatically for a new class count)')
  else:
    advice = (f'set --config.model.num_classes={info.num_classes}, or use data with {num_classes} classes')
  count = f'{info.num_classes} class' + ('' if info.num_classes == 1 else 'es')
  problems.append(f'model.num_classes={num_classes} but {where} has {count}: {advice}')


def _check_init_from(config, problems: List[str]) -> None:
  path = config.get('init_from')
  if not path or '://' in path:
    return
  accepted = f"a run's workdir, a checkpoint folder, or weights ({WEIGHT_SUFFIXES})"
  if not os.path.exists(path):
    problems.append(f'init_from={path!r} does not exist; accepted: {accepted}')
  elif os.path.isdir(path):
    ckpt_dir = os.path.join(path, 'checkpoints')
    ckpt_dir = ckpt_dir if os.path.isdir(ckpt_dir) else path
    if not any(d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir)):
      problems.append(f'init_from={path!r} holds no checkpoint (no step folder in {ckpt_dir!r}); '
                      f'accepted: {accepted}')


def _check_layout(config, process_count: int, local_devices: int, problems: List[str]) -> None:
  bs, accum, eval_bs = (_get(config, k) for k in ('batch_size', 'grad_accum_steps', 'eval_batch_size'))
  if _is_int(bs) and _is_int(accum) and bs >= 1 and accum >= 1:
    try:
      micro = check_batch_layout(bs, accum, process_count, local_devices)
    except ConfigError as e:
      problems.extend(e.problems)
    else:
      aug = config.dataset.augment
      mixing = (_is_num(aug.get('mixup_alpha')) and aug.mixup_alpha > 0) or aug.get('cutmix') is True
      if mixing and config.dataset.name != 'fake' and micro * accum < 2:
        problems.append(f'batch_size={bs} gives {micro * accum} image(s) per device; MixUp/CutMix '
                        '(dataset.augment.mixup_alpha > 0 or cutmix=True) need at least 2')
      rho, fraction = (_get(config, k) for k in ('optimizer.sam_rho', 'optimizer.sam_batch_fraction'))
      if _is_num(rho) and rho > 0 and _is_num(fraction) and 0 < fraction <= 1 and int(fraction * micro) < 1:
        problems.append(f'optimizer.sam_batch_fraction={fraction} leaves no example for SAM\'s ascent step '
                        f'on a device of {micro} images (batch_size={bs}); accepted: at least '
                        f'{1 / micro:.3g} here, or a larger batch_size')
  if _is_int(eval_bs) and eval_bs >= 1:
    try:
      check_batch_layout(eval_bs, 1, process_count, local_devices, field='eval_batch_size')
    except ConfigError as e:
      problems.extend(e.problems)


def _check_ra_ops(config, problems: List[str]) -> None:
  ra_ops = _get(config, 'dataset.augment.ra_ops')
  if ra_ops is _MISSING or config.dataset.get('name') == 'fake':
    return                    # fake data is not augmented
  if ra_ops not in RA_OPS:
    problems.append(f'dataset.augment.ra_ops={ra_ops!r} must be one of {", ".join(map(repr, RA_OPS))}')


def _check_tuning_switch(problems: List[str]) -> None:
  """The NFNETS_TUNING environment variable (nfnets/cpu/tuning.py) is read while compiling: check it first."""
  try:
    tuning.enabled()
  except ValueError as e:
    problems.append(f'environment variable {e}')


def validate(config, process_count: Optional[int] = None, local_devices: Optional[int] = None):
  """Checks the whole config; raises ConfigError listing every problem (one line each).

  With `process_count` and `local_devices`, also checks that batch_size and eval_batch_size split evenly.
  Reads the dataset's metadata (class count, split sizes; a folder is listed, nothing is decoded) and
  returns its `DatasetInfo`, or None when it cannot be known offline (a TFDS community dataset).
  """
  problems: List[str] = []
  _check_fields(config, problems)
  _check_init_from(config, problems)
  info = _check_dataset(config, problems)
  _check_classes(config, info, problems)
  _check_ra_ops(config, problems)
  _check_tuning_switch(problems)
  if process_count is not None and local_devices is not None:
    _check_layout(config, process_count, local_devices, problems)
  if info is not None and not problems:
    try:
      resolve_training_steps(config, info.num_train_examples)
    except ConfigError as e:
      problems.extend(e.problems)
  if problems:
    raise ConfigError(problems)
  return info
