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
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import experiment
from nfnets import config_validation
from nfnets import distributed

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
USER_ERROR_EXIT = 2
# TensorFlow's import-time lines that are not INFO records themselves.
_TF_INFO_PREFIXES = ('WARNING: All log messages before absl::InitializeLog()',
                     'To enable the following instructions:')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/f0.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible); eval: evaluate the latest checkpoint.')
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
  """Reports a user error as `error: <line>` lines on stderr and exits with status 2."""
  for line in [lines] if isinstance(lines, str) else lines:
    print(f'error: {line}', file=sys.stderr)
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT)


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


class ProjectLogFilter(std_logging.Filter):
  """Passes WARNING and above from anyone, and lower levels only from this project's own files (not from
  installed packages such as orbax, which logs every checkpoint step at INFO through absl)."""

  def __init__(self, root: str = PROJECT_ROOT):
    super().__init__()
    self.root = os.path.abspath(root)

  def is_project_file(self, path: str) -> bool:
    path = os.path.abspath(path)
    if not path.startswith(self.root + os.sep):
      return False
    parts = os.path.relpath(path, self.root).split(os.sep)[:-1]
    return not any(p in ('site-packages', 'dist-packages') or p.startswith('.') for p in parts)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or self.is_project_file(record.pathname)


def configure_console() -> None:
  """The project's INFO lines and everyone's warnings; --verbosity=1: everyone's INFO; 2: DEBUG too."""
  verbosity = flags.FLAGS.verbosity if flags.FLAGS['verbosity'].present else 0
  if verbosity < 0:
    return                               # absl: WARNING (-1) and up only
  if verbosity <= 1:
    logging.set_verbosity(logging.INFO)
  if verbosity == 0:
    logging.get_absl_handler().addFilter(ProjectLogFilter())
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')   # TensorFlow's C++ INFO lines
    import_tensorflow_quietly()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (the input pipeline and TensorBoard need it) without its import-time C++ INFO lines.

  Loading its libraries logs a oneDNN notice twice, each after a line saying absl's C++ logging is not
  initialised; TF_CPP_MIN_LOG_LEVEL does not reach them. stderr is captured during the import and every
  other line (warnings, errors) is written back.
  """
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not (re.match(r'I\d{4} ', line) or line.startswith(_TF_INFO_PREFIXES)):
          sys.stderr.write(line)
      sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  configure_console()
  # Before anything touches a device.
  cluster = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(cluster, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  config = _CONFIG.value
  try:
    info = config_validation.validate(config, process_count=jax.process_count(),
                                      local_devices=jax.local_device_count())
    if config.training_steps is None:
      if info is None:
        from nfnets import data  # pylint: disable=g-import-not-at-top
        info = data.dataset_info(config.dataset)
      config.training_steps = config_validation.resolve_training_steps(config, info.num_train_examples)
      logging.info('training_steps=%d: %s epochs of %d examples at batch_size %d', config.training_steps,
                   config.epochs, info.num_train_examples, config.batch_size)
    with distributed.exit_hard_on_error():
      run(config)
  except config_validation.ConfigError as e:
    user_error(e.problems)


def run(config):
  logging.info('JAX %s: process %d of %d, %d local device(s) of %d (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  xp = experiment.Experiment(config)
  trainer = experiment.Trainer(xp, _WORKDIR.value)
  if _MODE.value == 'eval':
    metrics = trainer.evaluate_checkpoint()
    if jax.process_index() == 0:
      print({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
    return
  trainer.train()
  logging.info('Done. Logs: %s/metrics.jsonl and %s/tensorboard; checkpoints: %s',
               trainer.workdir, trainer.workdir, trainer.io.checkpoint_dir)
  if jax.process_index() == 0:
    print(f'Logs: {trainer.io.workdir}/metrics.jsonl (TensorBoard: {trainer.io.workdir}/tensorboard)\n'
          f'Checkpoints: {trainer.io.checkpoint_dir}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
