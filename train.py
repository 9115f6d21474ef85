"""Train or evaluate an NFNet: `python train.py --config=configs/f0.py --workdir=runs/f0`.

Every config field can be overridden: `--config.optimizer.agc.clipping=0.02 --config.batch_size=1024`.
A restart with the same workdir resumes from the latest checkpoint.

Multi-process (TPU pods, GPU clusters): see nfnets/distributed.py. On a TPU pod or under SLURM nothing extra
is needed; elsewhere start one process per host with --coordinator_address/--num_processes/--process_id.
`python -m tools.launch_local` starts several processes on this machine for testing.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import experiment
from nfnets import distributed

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  # Before anything touches a device.
  cluster = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(cluster, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
  with distributed.exit_hard_on_error():
    run(_CONFIG.value)


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
  app.run(main)
