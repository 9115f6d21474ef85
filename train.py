"""Train or evaluate an NFNet: `python train.py --config=configs/f0.py --workdir=runs/f0`.

Every config field can be overridden: `--config.optimizer.agc.clipping=0.02 --config.batch_size=1024`.
A restart with the same workdir resumes from the latest checkpoint.

Multi-process (TPU pods, GPU clusters): see nfnets/distributed.py. On a TPU pod or under SLURM nothing extra
is needed; elsewhere start one process per host with --coordinator_address/--num_processes/--process_id.
`python -m tools.launch_local` starts several processes on this machine for testing.

The whole config is checked before any data is read or anything compiles (nfnets/config_validation.py). A
user error (a bad value, an unknown config field, a missing config or init_from file, an unknown dataset)
prints `error: <message>` lines to stderr and exits with status 2, without a traceback.

Console: this project's INFO lines (progress, evals, checkpoints) and everyone's warnings.
`--verbosity=1` adds other libraries' INFO lines (orbax, ...); `--verbosity=2` their DEBUG lines too.
"""
import difflib
import importlib.util
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import experiment
from nfnets import config_validation
from nfnets import console
from nfnets import distributed
from nfnets import trainer as trainer_lib


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/f0.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible); eval: evaluate the latest checkpoint.')
_EVAL_SIZES = flags.DEFINE_list('eval_sizes', [], '--mode=eval: image sizes to evaluate at, e.g. 224,256,320 '
                                '(default: the config\'s eval size).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0 (multi-process runs without SLURM or a TPU pod).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', 300,
                                     'Seconds to wait for the coordinator and all processes; then fail.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer('heartbeat_timeout', 100,
                                          'Seconds without a heartbeat after which a peer counts as dead.')
flags.mark_flags_as_required(['config', 'workdir'])


def user_error(lines) -> None:
  """Reports a user error (`console.user_error`) and exits with its status."""
  sys.exit(console.user_error(lines))


def _config_arg(argv):
  """The value of the last --config in argv ('configs/f0.py' or 'configs/f0.py:plus'), or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.match(r'^--?config(=(.*))?$', arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return value


def _unknown_override(argv):
  """The first `--config.a.b` override in argv that names no field of the config, as a message, or None."""
  spec = _config_arg(argv)
  if not spec:
    return None
  path, *args = spec.split(':', 1)
  module_spec = importlib.util.spec_from_file_location('_config_to_check', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(*args)
  for arg in argv:
    m = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if not m:
      continue
    node, keys = config, m.group(1).split('.')
    for depth, key in enumerate(keys):
      fields = list(node.keys()) if hasattr(node, 'keys') else []
      if key not in fields:
        close = difflib.get_close_matches(key, fields, 1)
        hint = f"; did you mean '{'.'.join(keys[:depth] + close)}'?" if close else ''
        return f"--config.{m.group(1)}: the config has no field '{m.group(1)}'{hint}"
      node = node[key]
  return None


def parse_flags(argv):
  """absl's flag parsing, with user mistakes reported as one `error:` line and exit status 2."""
  spec = _config_arg(argv)
  if spec and not os.path.isfile(spec.split(':', 1)[0]):
    user_error(f"--config={spec}: no such config file {spec.split(':', 1)[0]!r}")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):   # an override of a field the config does not have
    message = _unknown_override(argv)
    if message is None:
      raise
    user_error(message)
  except flags.Error as e:
    text = str(e)
    if 'Error whilst parsing config file' in text:   # the config's get_config refused its argument
      last = text.strip().splitlines()[-1]
      text = f'--config={spec}: ' + re.sub(r'^(ValueError|TypeError): ', '', last)
    user_error(' '.join(text.split()))


def parse_size(text: str) -> int:
  if not text.strip().isdigit() or int(text) < 1:
    raise config_validation.ConfigError(f'--eval_sizes: {text!r} is not a positive image size in pixels')
  return int(text)


def eval_table(results) -> str:
  """One row per eval size: top-1/top-5 of the raw and the EMA params, as a markdown table."""
  keys = [k for k in ('top1', 'top5', 'ema_top1', 'ema_top5') if k in results[0]]
  lines = ['| size | examples | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 2) + '|']
  for r in results:
    lines.append(f"| {r['image_size']} | {r['num_examples']} | "
                 + ' | '.join(f'{100 * r[k]:.2f}%' for k in keys) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.configure(flags.FLAGS.verbosity if flags.FLAGS['verbosity'].present else 0)
  # Before anything touches a device.
  cluster = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(cluster, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  config = _CONFIG.value
  try:
    eval_sizes = [parse_size(s) for s in _EVAL_SIZES.value]
    # The Experiment validates the whole config first thing, before any data is read or anything compiles.
    with distributed.exit_hard_on_error(user_errors=config_validation.ConfigError):
      run(config, eval_sizes)
  except config_validation.ConfigError as e:
    user_error(e.problems)


def run(config, eval_sizes=()):
  xp = experiment.Experiment(config)  # validates the config first
  logging.info('JAX %s: process %d of %d, %d local device(s) of %d (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  trainer = trainer_lib.Trainer(xp, _WORKDIR.value)
  if _MODE.value == 'eval':
    results = trainer.evaluate_checkpoint(eval_sizes)
    if jax.process_index() == 0:
      print(eval_table(results))
    return
  trainer.train()
  logging.info('Done. Logs: %s/metrics.jsonl and %s/tensorboard; checkpoints: %s',
               trainer.workdir, trainer.workdir, trainer.io.checkpoint_dir)
  if jax.process_index() == 0:
    print(f'Logs: {trainer.io.workdir}/metrics.jsonl (TensorBoard: {trainer.io.workdir}/tensorboard)\n'
          f'Checkpoints: {trainer.io.checkpoint_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
