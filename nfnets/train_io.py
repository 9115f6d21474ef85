"""What a training run writes to its workdir: orbax checkpoints, metrics.jsonl, TensorBoard, console lines.

Only process 0 writes logs. Every process calls `save` with the same host NumPy state (the params are
replicated over all devices); orbax writes NumPy leaves from process 0 only and syncs the processes. A checkpoint of another
model, or with other shapes, is refused before any compute, so a good checkpoint is never overwritten.
"""
import datetime
import json
import os
from typing import Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets.train_state import TrainState, unreplicate

STATE_FIELDS = ('step', 'params', 'opt_state', 'ema_params', 'rng', 'bad_step')


def _shapes(params) -> dict:
  return {f'{m}/{n}': list(np.shape(v)) for m, ps in params.items() for n, v in ps.items()}


def _fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunIO:
  """Checkpoint manager and metric writers of one workdir."""

  def __init__(self, workdir: str, config, experiment):
    self.workdir = os.path.abspath(workdir)
    self.checkpoint_dir = os.path.join(self.workdir, 'checkpoints')
    self.config = config
    self.is_writer = jax.process_index() == 0
    os.makedirs(self.workdir, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.checkpoint_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
        item_names=('state', 'meta'))
    self._metrics_file = None
    self._tb = None

  def write_config(self) -> None:
    """Records the run's config; called once the workdir is known to hold no incompatible checkpoint."""
    if self.is_writer:
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(self.config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------ checkpoints
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def agreed_latest_step(self) -> Optional[int]:
    """The latest step, the same on every process: process 0's, checked against each process's own view.

    Processes that resumed from different steps would feed mismatched states into the same collectives.
    """
    step = self.manager.latest_step()
    if jax.process_count() == 1:
      return step
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    mine = -1 if step is None else int(step)
    agreed = int(multihost_utils.broadcast_one_to_all(np.int32(mine)))
    if agreed != mine:
      raise RuntimeError(
          f'Process {jax.process_index()} sees latest checkpoint step {step} in {self.checkpoint_dir} but '
          f'process 0 sees {None if agreed < 0 else agreed}. Every process must see the same workdir: put '
          'it on storage they all share (GCS, NFS, Lustre).')
    return None if agreed < 0 else agreed

  def _meta(self, step, params) -> dict:
    m = self.config.model
    return {'step': int(step), 'model': m.name, 'num_classes': int(m.num_classes),
            'param_shapes': _shapes(params)}

  def save(self, step: int, state) -> None:
    host = unreplicate(state)
    tree = {k: getattr(host, k) for k in STATE_FIELDS}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(self._meta(step, host.params))))
    logging.info('Saved checkpoint at step %d in %s', step, self.checkpoint_dir)

  def check_compatible(self, meta: dict, params, where: str) -> None:
    """Raises ValueError when a checkpoint's model or shapes differ from this run's."""
    m = self.config.model
    problems = []
    if meta.get('model') != m.name:
      problems.append(f"model {meta.get('model')!r} (this run: {m.name!r})")
    if meta.get('num_classes') != m.num_classes:
      problems.append(f"num_classes {meta.get('num_classes')} (this run: {m.num_classes})")
    want, got = _shapes(params), meta.get('param_shapes', {})
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
      problems.append(f'{len(diff)} params with other names/shapes, e.g. ' + ', '.join(
          f'{k}: {got.get(k)} vs {want.get(k)}' for k in diff[:5]))
    if problems:
      raise ValueError(f'The checkpoint in {where} is incompatible with this config: '
                       + '; '.join(problems) + '. Use another --workdir, or fix the config.')

  def restore(self, experiment):
    """The latest checkpoint as a replicated TrainState, or None when the workdir has none."""
    step = self.agreed_latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    host_template = experiment.state_template()
    self.check_compatible(meta, host_template.params, self.checkpoint_dir)
    target = {k: getattr(host_template, k) for k in STATE_FIELDS}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
    logging.info('Resumed from step %d in %s', step, self.checkpoint_dir)
    # orbax returns plain containers; rebuild the optimizer-state structure from the template.
    restored['opt_state'] = jax.tree.unflatten(jax.tree.structure(target['opt_state']),
                                               jax.tree.leaves(restored['opt_state']))
    return experiment.put_state(TrainState(**{k: restored[k] for k in STATE_FIELDS}))

  def init_from(self, experiment, path: str):
    """A fresh state whose params (and EMA) come from `path`; see `load_init_params`."""
    fresh = experiment.init_params(jax.random.split(jax.random.PRNGKey(experiment.config.seed))[0])
    return experiment.state_from_params(load_init_params(path, jax.device_get(fresh)))

  # ------------------------------------------------------------ logs
  def _write(self, record: dict) -> None:
    if not self.is_writer:
      return
    if self._metrics_file is None:
      self._metrics_file = open(os.path.join(self.workdir, 'metrics.jsonl'), 'a')
    self._metrics_file.write(json.dumps(record) + '\n')
    self._metrics_file.flush()
    if self._tb is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(self.workdir, 'tensorboard'))
    with self._tb.as_default(step=record['step']):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      for k, v in record.items():
        if k not in ('step', 'kind') and isinstance(v, (int, float)):
          tf.summary.scalar(f"{record['kind']}/{k}", v)
    self._tb.flush()

  def log_train(self, step: int, metrics: dict, eta_s: float) -> None:
    self._write({'step': step, 'kind': 'train', **metrics})
    if self.is_writer:
      logging.info('step %d/%d | loss %.4f | top1 %.2f%% | lr %.4g | clip %.3f | %.1f img/s | ETA %s',
                   step, self.config.training_steps, metrics['loss'], 100 * metrics['top1'],
                   metrics['lr'], metrics['clip_fraction'], metrics['images_per_sec'],
                   _fmt_duration(eta_s))

  def log_eval(self, step: int, metrics: dict) -> None:
    self._write({'step': step, 'kind': 'eval', **metrics})
    if self.is_writer:
      logging.info('eval at step %d on %d examples | top1 %.2f%% top5 %.2f%% loss %.4f | '
                   'EMA top1 %.2f%% top5 %.2f%% loss %.4f', step, metrics['num_examples'],
                   100 * metrics['top1'], 100 * metrics['top5'], metrics['loss'],
                   100 * metrics['ema_top1'], 100 * metrics['ema_top5'], metrics['ema_loss'])

  def close(self) -> None:
    self.manager.wait_until_finished()
    if self._metrics_file is not None:
      self._metrics_file.close()
      self._metrics_file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_weights(path: str):
  """Params from a run's workdir or checkpoint folder (its EMA params), DeepMind released weights
  (pickle), our flat .npz, or a timm state dict (.safetensors / .pth)."""
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.abspath(path)  # orbax refuses relative checkpoint paths
    ckpt_dir = os.path.join(path, 'checkpoints') if os.path.isdir(os.path.join(path, 'checkpoints')) else path
    with ocp.CheckpointManager(ckpt_dir, item_names=('state', 'meta'),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint found in {ckpt_dir}')
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
    logging.info('Initialising from the EMA params of %s at step %d', ckpt_dir, step)
    return jax.tree.map(np.asarray, state['ema_params'])
  return weights.read(path)


def load_init_params(path: str, template):
  """Weights from `path` placed into `template` (this run's freshly initialised params).

  Every param must match by name and shape, except the classifier (`linear` outside squeeze-excite),
  which keeps its fresh init when its shape differs: that is fine-tuning to a new class count.
  """
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  return weights.fit_to_template(read_weights(path), template, source=path)
