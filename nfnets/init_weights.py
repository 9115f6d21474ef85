"""Weights to start from or to predict with: a run's workdir or checkpoint folder (the EMA params of its
newest readable checkpoint), or any weights file `nfnets.weights` reads (released pickle, flat .npz, timm).

`read_weights` returns the tree; `load_init_params` fits it into a run's freshly initialised params (a
classifier of another width is re-initialised: fine-tuning to a new class count).
"""
import os

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets.console import error_summary


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a run's workdir could be read."""


def _read_ema_params(ckpt_dir: str):
  """The EMA params of the newest checkpoint in `ckpt_dir` that can be read (damaged ones are skipped with
  a warning)."""
  # The finished steps, listed as orbax names them (a read-only CheckpointManager would log three
  # warnings about being read-only on every fine-tune).
  try:
    steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  except OSError:
    steps = []
  if not steps:
    raise FileNotFoundError(f'No checkpoint found in {ckpt_dir}')
  errors = []
  for step in steps:
    path = ocp.step.standard_name_format().find_step(epath.Path(ckpt_dir), step).path
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(path / 'state')
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'step {step} at {path}: {error_summary(e)}')
      logging.warning('Checkpoint step %d at %s is damaged (%s); trying an older one.', step, path,
                      error_summary(e))
      continue
    finally:
      handler.close()
    logging.info('Read the EMA params of %s at step %d', ckpt_dir, step)
    return jax.tree.map(np.asarray, state['ema_params'])
  raise CheckpointRestoreError(f'No checkpoint in {ckpt_dir} can be read: ' + '; '.join(errors))


def read_weights(path: str):
  """Params from a run's workdir or checkpoint folder (its EMA params), DeepMind released weights
  (pickle), our flat .npz, or a timm state dict (.safetensors / .pth)."""
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.abspath(path)  # orbax refuses relative checkpoint paths
    ckpt_dir = os.path.join(path, 'checkpoints') if os.path.isdir(os.path.join(path, 'checkpoints')) else path
    return _read_ema_params(ckpt_dir)
  return weights.read(path)


def load_init_params(path: str, template):
  """Weights from `path` placed into `template` (this run's freshly initialised params).

  Every param must match by name and shape, except the classifier (`linear` outside squeeze-excite),
  which keeps its fresh init when its shape differs: that is fine-tuning to a new class count.
  """
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  return weights.fit_to_template(read_weights(path), template, source=path)
