"""Train or evaluate an NFNet: `python train.py --config=configs/f0.py --workdir=runs/f0`.

Every config field can be overridden: `--config.optimizer.agc.clipping=0.02 --config.batch_size=1024`.
A restart with the same workdir resumes from the latest checkpoint.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import experiment

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, e.g. configs/f0.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible); eval: evaluate the latest checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  logging.info('JAX %s: %d process(es), %d local device(s) (%s)', jax.__version__, jax.process_count(),
               jax.local_device_count(), jax.default_backend())
  xp = experiment.Experiment(config)
  trainer = experiment.Trainer(xp, _WORKDIR.value)
  if _MODE.value == 'eval':
    metrics = trainer.evaluate_checkpoint()
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})
    return
  trainer.train()
  logging.info('Done. Logs: %s/metrics.jsonl and %s/tensorboard; checkpoints: %s',
               trainer.workdir, trainer.workdir, trainer.io.checkpoint_dir)
  print(f'Logs: {trainer.io.workdir}/metrics.jsonl (TensorBoard: {trainer.io.workdir}/tensorboard)\n'
        f'Checkpoints: {trainer.io.checkpoint_dir}')


if __name__ == '__main__':
  app.run(main)
