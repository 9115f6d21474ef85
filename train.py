"""Train or evaluate an NFNet: `python train.py --config=configs/f0.py --workdir=runs/f0`.

Every config field can be overridden: `--config.optimizer.agc.clipping=0.02 --config.batch_size=1024`.
A restart with the same workdir resumes from the latest checkpoint.

Multi-process (TPU pods, GPU clusters): see nfnets/distributed.py. On a TPU pod or under SLURM nothing extra
is needed; elsewhere start one process per host with --coordinator_address/--num_processes/--process_id.
`python -m tools.launch_local` starts several processes on this machine for testing.

A workdir that holds a run supplies its own config (its config.json): `--mode=eval`, a resume, or a longer
run need only `--workdir` and the overrides; `--config` is then optional and applies only to a new run. A
saved config.json is also accepted as `--config` (nfnets/run_config.py).

The whole config is checked before any data is read or anything compiles (nfnets/config_validation.py).
Failures end in one `error: ...` line on stderr, without a traceback (nfnets/console.py):
  exit 2   a user error: a bad value, an unknown config field, a missing config or init_from file, an
           unknown dataset, a workdir whose checkpoints are of another architecture than the config;
  exit 3   the loss or gradient became NaN/Inf (the last good checkpoint is kept);
  exit 74  the storage refused a write (a full disk or quota, a read-only workdir): the checkpoints already
           written stay intact, and rerunning the same command resumes from the newest one.

`--mode=eval --eval_sizes=224,256` logs each size as its own series (`eval_224px/top1`, records of kind
`eval_224px` in metrics.jsonl), so the run's own `eval/top1` curve is left as training wrote it.

Console: this project's INFO lines (progress, evals, checkpoints) and everyone's warnings.
`--verbosity=1` adds other libraries' INFO lines (orbax, ...); `--verbosity=2` their DEBUG lines too.
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from configs import base
import experiment
from nfnets import config_validation
from nfnets import console
from nfnets import data as data_lib
from nfnets import distributed
from nfnets import run_config
from nfnets import run_dir
from nfnets import trainer as trainer_lib


_CONFIG = run_config.define_config_flag(
    base.get_config, 'A config file, e.g. configs/f0.py, or a saved run\'s config.json; optional when --workdir '
    'holds a run (its config.json is then the config).')
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
flags.mark_flags_as_required(['workdir'])


# One `error:` line each (nfnets/console.py): exit 2 for these, 3 for a NaN/Inf loss, 74 for a full or
# read-only disk.
USER_ERRORS = (config_validation.ConfigError, run_dir.IncompatibleCheckpointError, run_dir.CheckpointRestoreError)


def parse_flags(argv):
  """absl's flag parsing; a --workdir that holds a run supplies its saved config (`nfnets.run_config`)."""
  return run_config.parse_flags(argv, base.get_config)


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
  # Before anything touches a device.
  cluster = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(cluster, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  eval_sizes = [parse_size(s) for s in _EVAL_SIZES.value]
  # The Experiment validates the whole config first thing, before any data is read or anything compiles.
  with distributed.exit_hard_on_error(user_errors=USER_ERRORS):
    try:
      run(_CONFIG.value, eval_sizes)
    except trainer_lib.NonFiniteLossError as e:
      print(f'error: {e}', file=sys.stderr)
      return console.DIVERGED_EXIT
  return 0


def fit_batch_to_data(config) -> None:
  """`fit_batch_to_data` recipes (configs/finetune.py): a batch no larger than the train split, set before
  the Experiment splits it over the devices. An unreadable dataset is left to the Experiment's validation."""
  if not config.get('fit_batch_to_data'):
    return
  try:
    num_train = data_lib.dataset_info(config.dataset).num_train_examples
  except Exception:  # pylint: disable=broad-except
    return
  before = config.batch_size
  if config_validation.fit_batch_to_data(config, num_train, jax.process_count(), jax.local_device_count()):
    logging.info('batch_size=%d is more than the %d train examples: batch_size=%d (fit_batch_to_data); '
                 'epochs and optimizer.warmup_epochs count steps of it', before, num_train, config.batch_size)


def run(config, eval_sizes=()):
  fit_batch_to_data(config)
  xp = experiment.Experiment(config)  # validates the config first
  logging.info('%s', run_config.describe())
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


def cli():
  """The `nfnets-train` command (pyproject.toml); `python train.py` runs the same."""
  console.run(main, USER_ERRORS, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
