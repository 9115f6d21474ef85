"""The training loop around an `experiment.Experiment`: checkpoints, logs, preemption and NaN handling.

The loop never waits on the devices between steps: metrics are fetched once per log interval. Only the
experiment's public methods are used (state construction, `train_step`, `evaluate`, `put_state`), so this
module knows no model, data or optimizer.
"""
import signal
import time
from typing import Dict, List, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from nfnets import config_validation
from nfnets import run_dir
from nfnets.devices import to_host
from nfnets.train_state import TrainState


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; train.py reports it in one line and exits with status 3."""


class Trainer:
  """The training loop around an `Experiment`: checkpoints, logs, preemption and NaN handling."""

  def __init__(self, experiment, workdir: str):
    self.xp, self.config, self.workdir = experiment, experiment.config, workdir
    self.io = run_dir.RunDir(workdir, self.config)
    self._stop_requested = False

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing at the end of this step, then exiting.')
    self._stop_requested = True

  def restore_or_init(self) -> TrainState:
    """The workdir's newest intact checkpoint, else `init_from` weights, else a fresh state."""
    host = self.io.restore(self.xp.state_template())
    if host is not None:
      return self.xp.put_state(host)
    if self.config.init_from:
      return self._state_from(self.config.init_from)
    if self.config.get('finetune'):
      logging.warning('init_from is empty: this fine-tuning run starts from a random init, not from '
                      "pretrained weights. Set --config.init_from to a run's workdir (e.g. runs/demo) or a "
                      'weights file (F0_haiku.npz, a flat .npz, a timm .safetensors).')
    return self.xp.init_state()

  def _state_from(self, path: str) -> TrainState:
    fresh = self.xp.init_params(jax.random.split(jax.random.PRNGKey(self.config.seed))[0])
    return self.xp.state_from_params(self.io.init_params(path, jax.device_get(fresh)))

  def train(self) -> TrainState:
    cfg = self.config
    state = self.restore_or_init()
    self.io.write_config()
    step = int(to_host(state.step))
    if step >= cfg.training_steps:
      logging.info('Checkpoint is at step %d >= training_steps %d: nothing to train.', step,
                   cfg.training_steps)
      return state
    # Several processes must stop after the same step, or the rest wait forever in the next collective:
    # JAX's preemption service (its own SIGTERM handler) agrees on that step; one process stops alone.
    multi = jax.process_count() > 1
    previous = None if multi else signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      state = self._loop(state, step)
    finally:
      if not multi:
        signal.signal(signal.SIGTERM, previous)
      self.io.close()
    return state

  def _loop(self, state: TrainState, step: int) -> TrainState:
    cfg, xp = self.config, self.xp
    batches = xp.train_batches(step)
    pending, t_last, step_last = [], time.time(), step
    t_start, step_start = t_last, step
    while step < cfg.training_steps:
      state, metrics = xp.train_step(state, next(batches))
      pending.append(metrics)
      step += 1
      if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
        logging.warning('SIGTERM received by a process: all processes checkpoint at step %d and exit.', step)
        self._stop_requested = True
      last = step == cfg.training_steps
      if step % cfg.log_every == 0 or last or self._stop_requested:
        self._check_finite(state)
        now = time.time()
        fetched = to_host(pending)  # the only host sync: once per log interval
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        summary['lr'] = float(fetched[-1]['lr'])
        summary['steps_per_sec'] = (step - step_last) / max(now - t_last, 1e-9)
        summary['images_per_sec'] = summary['steps_per_sec'] * cfg.batch_size
        self.io.log_train(step, summary, eta_s=(cfg.training_steps - step) * (now - t_start) /
                          max(step - step_start, 1))
        pending, t_last, step_last = [], now, step
      t_pause = time.time()
      if (cfg.eval_every and step % cfg.eval_every == 0) or last:
        self.io.log_eval(step, xp.evaluate(state))
      if step % cfg.checkpoint_every == 0 or last or self._stop_requested:
        self._check_finite(state)
        self.io.save(step, state)
      t_last += time.time() - t_pause  # images/s counts training time only, not eval or saving
      if self._stop_requested:
        logging.warning('Stopped at step %d after SIGTERM; the checkpoint is saved.', step)
        break
    return state

  def _check_finite(self, state: TrainState):
    bad = int(to_host(state.bad_step))
    if bad >= 0:
      self.io.close()
      raise NonFiniteLossError(
          f'Loss or gradient became NaN/Inf at step {bad}; training stopped. The last good checkpoint '
          f'in {self.io.checkpoint_dir} is kept (latest step: {self.io.latest_step()}).')

  def evaluate_checkpoint(self, image_sizes: Sequence[int] = ()) -> List[Dict[str, float]]:
    """Evaluates the workdir's newest intact checkpoint (or `init_from` weights when it has none) at each
    of `image_sizes` (default: the config's eval size); one metrics dict each.

    Each size is logged as its own series, `eval_<size>px` (metrics.jsonl records of that kind,
    TensorBoard tags `eval_<size>px/top1`, ...): the training run's `eval` series, one point per eval
    step, stays as training wrote it.
    """
    host = self.io.restore(self.xp.state_template())
    if host is not None:
      state = self.xp.put_state(host)
    elif self.config.init_from:
      state = self._state_from(self.config.init_from)
    else:
      raise config_validation.ConfigError(
          f'--mode=eval: no checkpoint in {self.io.checkpoint_dir} and no init_from to evaluate; train '
          'first or pass --config.init_from=PATH')
    step = int(to_host(state.step))
    results = []
    for size in image_sizes or [None]:
      results.append(self.xp.evaluate(state, size))
      self.io.log_eval(step, results[-1], kind=f"eval_{results[-1]['image_size']}px")
    self.io.close()
    return results
