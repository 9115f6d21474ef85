"""What a training run writes to its workdir: orbax checkpoints, metrics.jsonl, TensorBoard, console lines.

Only process 0 writes logs. Every process calls `save` with the same state (the params are replicated over
all devices); orbax writes NumPy leaves from process 0 only and syncs the processes. Nothing here calls back
into the Experiment: `restore` fills a template the caller gives and returns host NumPy arrays, which the
caller places on its devices.

Checkpoints are tried newest first. One that cannot be read (a truncated or missing file, bad JSON) is
damaged: a WARNING names its path and the error, and the next older one is tried. One of another model or
with other shapes (this config changed) is refused at once (`IncompatibleCheckpointError`) before any
compute, so a good checkpoint is never overwritten and an old one is never silently used instead. When
every checkpoint is damaged, `CheckpointRestoreError` names each step, path and error; nothing is moved.

After restoring an older step S, each damaged newer step directory is renamed aside to
`<step>.damaged-<UTC time>` (kept, never deleted). Left in place, orbax would count it as the latest step
and silently skip every save up to and including its step number (`CheckpointManager.should_save` refuses
steps <= the latest), keep it among `keep_checkpoints` while deleting good ones, and make every later
start try it again. orbax ignores directories whose names are not step numbers.

metrics.jsonl is the log of record: on restoring step S, the records of steps > S (written before the
interruption, trained again now) are dropped, atomically (a temporary file renamed over it), so it holds
one history. TensorBoard's event files are append-only and are left as they are: the interrupted steps'
points stay in the older event file next to the repeated ones.
"""
import contextlib
import datetime
import errno
import json
import os
import time
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets import console
from nfnets import init_weights
from nfnets.init_weights import CheckpointRestoreError  # pylint: disable=unused-import  (raised here too)
from nfnets.devices import to_host
from nfnets.train_state import TrainState

STATE_FIELDS = TrainState._fields
ITEMS = ('state', 'meta')


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another model, class count or shapes than this run's config."""


def _shapes(params) -> dict:
  return {f'{m}/{n}': list(np.shape(v)) for m, ps in params.items() for n, v in ps.items()}


def _key(k) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey (NamedTuple fields), SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _layout(tree) -> dict:
  """'path/to/leaf' -> shape. orbax stores a NamedTuple as a dict of its fields: paths agree across both."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): tuple(getattr(x, 'shape', np.shape(x))) for path, x in leaves}


def _fmt_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunDir:
  """Checkpoints and metric writers of one workdir."""

  def __init__(self, workdir: str, config):
    self.workdir = os.path.abspath(workdir)
    self.checkpoint_dir = os.path.join(self.workdir, 'checkpoints')
    self.config = config
    self.is_writer = jax.process_index() == 0
    self._metrics_file = None
    self._tb = None
    self._pending_step = None   # the step orbax may still be writing in the background
    self._faulted = False
    with self._writing(self.workdir, 'opening the run directory'):
      os.makedirs(self.workdir, exist_ok=True)
      # cleanup_tmp_directories: a checkpoint cut short (a full disk, a kill) stays in orbax's temporary
      # folder `<step>.orbax-checkpoint-tmp`, which is never listed as a step; it is removed here.
      self.manager = ocp.CheckpointManager(
          self.checkpoint_dir, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
              max_to_keep=config.keep_checkpoints, create=True, cleanup_tmp_directories=True))
    unfinished = sorted(d for d in os.listdir(self.checkpoint_dir) if '.orbax-checkpoint-tmp' in d)
    if unfinished and self.is_writer:
      logging.info('Removing %s in %s: checkpoint writes that were cut short (never restored).',
                   ', '.join(unfinished), self.checkpoint_dir)

  def write_config(self) -> None:
    """Records the run's config; called once the workdir is known to hold no incompatible checkpoint."""
    if self.is_writer:
      path = os.path.join(self.workdir, 'config.json')
      with self._writing(path, "writing the run's config"):
        with open(path, 'w') as f:
          f.write(self.config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------ storage faults
  def intact_steps(self):
    """The finished checkpoints on disk (orbax renames a step's folder to its number once it is whole)."""
    try:
      return sorted(int(d) for d in os.listdir(self.checkpoint_dir) if d.isdigit())
    except OSError:
      return []

  @contextlib.contextmanager
  def _writing(self, path: str, what: str):
    """Turns a fault of the storage while doing `what` to `path` into one `console.StorageFault` whose line
    names the path, what happened and what to do; what was written before is left as it is."""
    try:
      yield
    except console.StorageFault:
      raise
    except Exception as e:  # pylint: disable=broad-except
      code = console.storage_errno(e)
      if code is None:
        raise
      self._faulted = True
      steps = self.intact_steps()
      kept = (f'the checkpoints already written are intact (newest: step {steps[-1]})' if steps else
              'no checkpoint had been written yet')
      if code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        todo = ('free space (or move the workdir) and rerun the same command: it resumes from the newest '
                'intact checkpoint and removes the unfinished one')
      else:
        todo = f'make {self.workdir} writable, or copy it to writable storage and pass that --workdir'
      raise console.StorageFault(
          code, f'{path}: {console.STORAGE_ERRNOS[code]} while {what}; {kept}. To go on, {todo}.') from e

  # ------------------------------------------------------------ checkpoints
  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _agree(self, value: int, what: str) -> int:
    """Process 0's `value`; raises on every process when any process has another one.

    Processes that resumed from different steps would feed mismatched states into the same collectives.
    """
    if jax.process_count() == 1:
      return value
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    every = np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)
    if (every != every[0]).any():
      seen = ', '.join(f'process {i}: {"none" if v < 0 else int(v)}' for i, v in enumerate(every))
      raise RuntimeError(
          f'The processes disagree on the {what} in {self.checkpoint_dir} ({seen}). Every process must '
          'see the same workdir: put it on storage they all share (GCS, NFS, Lustre).')
    return int(every[0])

  def _meta(self, step, params) -> dict:
    m = self.config.model
    return {'step': int(step), 'model': m.name, 'num_classes': int(m.num_classes),
            'param_shapes': _shapes(params)}

  def _finish_pending_save(self) -> None:
    """Waits for the checkpoint orbax is writing in the background; a storage fault ends in one line."""
    step, self._pending_step = self._pending_step, None
    with self._writing(os.path.join(self.checkpoint_dir, str(step)), f'writing the checkpoint of step {step}'):
      self.manager.wait_until_finished()

  def save(self, step: int, state) -> None:
    """Saves a replicated (device) state; raises if orbax declines the step (a newer one exists), and a
    `console.StorageFault` when the storage refuses this or the previous (background) write."""
    host = to_host(state)
    tree = {k: getattr(host, k) for k in STATE_FIELDS}
    self._finish_pending_save()
    with self._writing(os.path.join(self.checkpoint_dir, str(step)), f'writing the checkpoint of step {step}'):
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(self._meta(step, host.params))))
    self._pending_step = step
    if not saved:
      raise RuntimeError(
          f'orbax did not save step {step} in {self.checkpoint_dir}: it already holds step '
          f'{self.manager.latest_step()}. Is another run writing to this workdir?')
    logging.info('Saved checkpoint at step %d in %s', step, self.checkpoint_dir)

  def check_compatible(self, meta: dict, params, where: str) -> None:
    """Raises IncompatibleCheckpointError when a checkpoint's model or shapes differ from this run's."""
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
      raise IncompatibleCheckpointError(
          f'The checkpoint in {where} is incompatible with this config: ' + '; '.join(problems)
          + ". Use another --workdir, or drop the overrides that change the model (the run's own settings "
          'are in its config.json).')

  @staticmethod
  def _check_layout(found, target, where: str) -> None:
    """The whole state (optimizer state too) against the template: other leaves or shapes are refused."""
    want, got = _layout(target), _layout(found)
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
      raise IncompatibleCheckpointError(
          f'The checkpoint in {where} is incompatible with this config: {len(diff)} state arrays with other '
          'names/shapes, e.g. ' + ', '.join(f'{k}: {got.get(k)} vs {want.get(k)}' for k in diff[:5])
          + ". Use another --workdir, or drop the overrides that change the model (the run's own settings "
          'are in its config.json).')

  def _step_path(self, step: int) -> epath.Path:
    return ocp.step.standard_name_format().find_step(epath.Path(self.checkpoint_dir), step).path

  def _read_step(self, path: epath.Path, target: dict) -> dict:
    """One checkpoint, read by this process alone (orbax's handlers; no cross-process barrier, so processes
    can try steps independently and agree afterwards). Incompatibility raises IncompatibleCheckpointError;
    anything else raised means the checkpoint is damaged."""
    meta = ocp.JsonCheckpointHandler().restore(path / 'meta', args=ocp.args.JsonRestore())
    self.check_compatible(meta, target['params'], str(path))
    handler = ocp.StandardCheckpointHandler()
    try:
      try:
        stored = handler.metadata(path / 'state').tree
      except Exception:  # pylint: disable=broad-except
        stored = None  # unreadable metadata: the restore below either manages without it or fails
      if stored is not None:
        self._check_layout(stored, target, str(path))
      state = handler.restore(path / 'state', args=ocp.args.StandardRestore(target))
    finally:
      handler.close()
    self._check_layout(state, target, str(path))  # orbax restores the stored shapes, not the target's
    found = {'/'.join(_key(k) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    # Rebuilt leaf by leaf in the template's structure (its NamedTuples), cast to its dtypes.
    return jax.tree.unflatten(treedef, [np.asarray(found['/'.join(_key(k) for k in p)], x.dtype)
                                        for p, x in paths])

  def restore(self, template: TrainState) -> Optional[TrainState]:
    """The newest checkpoint that can be read, as an unreplicated host TrainState of NumPy arrays in
    `template`'s structure and dtypes (`template`: NumPy zeros with this run's structure); None when the
    workdir has none. Every process restores process 0's step or all raise."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if self._agree(steps[0] if steps else -1, 'latest checkpoint step') < 0:
      return None
    target = {k: getattr(template, k) for k in STATE_FIELDS}
    damaged, restored, step = [], None, -2
    for step in steps:
      path = self._step_path(step)
      try:
        restored = self._read_step(path, target)
        break
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, path, e))
        logging.warning('Checkpoint step %d at %s is damaged and cannot be restored (%s); trying an older '
                        'one. It is kept.', step, path, console.error_summary(e))
    step = self._agree(step if restored is not None else -2, 'step to restore')
    if restored is None:
      raise CheckpointRestoreError(
          f'None of the {len(steps)} checkpoints in {self.checkpoint_dir} can be restored: '
          + '; '.join(f'step {s} at {p}: {console.error_summary(e)}' for s, p, e in damaged)
          + '. They are left as they are. Repair or move them, or use another --workdir.')
    if damaged:
      self._set_aside(damaged, step)
    self._drop_metrics_after(step)
    logging.info('Resumed from step %d in %s', step, self.checkpoint_dir)
    return TrainState(**restored)

  def _set_aside(self, damaged, restored_step: int) -> None:
    """Renames damaged checkpoints newer than the restored one to `<step>.damaged-<UTC time>` (see the
    module docstring for why they cannot stay)."""
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    if self.is_writer:
      for step, path, _ in damaged:
        aside = path.parent / f'{path.name}.damaged-{stamp}'
        with self._writing(str(path), 'moving a damaged checkpoint aside'):
          path.rename(aside)
        logging.warning('Moved the damaged checkpoint of step %d aside to %s (not deleted); restored step %d '
                        'instead.', step, aside, restored_step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('run_dir: damaged checkpoints set aside')
    self.manager.reload()

  def init_params(self, path: str, template_params):
    """The weights at `path` (a run's workdir or checkpoint folder: its EMA params; any weights file)
    fitted into `template_params`, this run's freshly initialised params; see
    `nfnets.init_weights.load_init_params`."""
    return init_weights.load_init_params(path, template_params)

  # ------------------------------------------------------------ logs
  def _drop_metrics_after(self, step: int) -> None:
    """Drops the metrics.jsonl records of steps > `step` (and unreadable lines, e.g. one cut short)."""
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if not self.is_writer or not os.path.exists(path):
      return
    if self._metrics_file is not None:
      self._metrics_file.close()
      self._metrics_file = None
    kept, stale, unreadable = [], 0, 0
    with open(path) as f:
      for line in f:
        if not line.strip():
          continue
        try:
          record_step = int(json.loads(line)['step'])
        except (ValueError, KeyError, TypeError):
          unreadable += 1
          continue
        if record_step > step:
          stale += 1
        else:
          kept.append(line if line.endswith('\n') else line + '\n')
    if stale or unreadable:
      tmp = f'{path}.tmp-{os.getpid()}'
      with self._writing(path, 'dropping the metrics of the steps trained again'):
        try:
          with open(tmp, 'w') as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
          os.replace(tmp, path)
        finally:
          with contextlib.suppress(OSError):
            os.remove(tmp)   # only left when the write failed: metrics.jsonl is then as it was
      logging.info('metrics.jsonl: dropped %d records of steps after %d (trained again after the resume)%s; '
                   '%d kept. TensorBoard event files keep their old points.', stale, step,
                   f' and {unreadable} unreadable lines' if unreadable else '', len(kept))

  def _write(self, record: dict) -> None:
    if not self.is_writer:
      return
    path = os.path.join(self.workdir, 'metrics.jsonl')
    with self._writing(path, 'logging the metrics'):
      if self._metrics_file is None:
        self._metrics_file = open(path, 'a')
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

  def log_eval(self, step: int, metrics: dict, kind: str = 'eval') -> None:
    """Logs an eval as records of `kind` (TensorBoard tags `<kind>/top1`, ...): 'eval' for the training
    run's own evals, `eval_<size>px` for evals at chosen sizes. Top-5 is left out of the line when the
    metrics lack it (a dataset of 5 classes or fewer)."""
    self._write({'step': step, 'kind': kind, **metrics})
    if self.is_writer:
      def scores(prefix):
        top5 = f" top5 {100 * metrics[prefix + 'top5']:.2f}%" if prefix + 'top5' in metrics else ''
        return f"top1 {100 * metrics[prefix + 'top1']:.2f}%{top5} loss {metrics[prefix + 'loss']:.4f}"
      logging.info('%s at step %d on %d examples | %s | EMA %s', kind, step, metrics['num_examples'],
                   scores(''), scores('ema_'))

  def close(self) -> None:
    """Finishes the background checkpoint write and closes the logs. After a storage fault (already
    reported) it only releases them: the unfinished checkpoint stays unfinished, never taken for whole."""
    reported = self._faulted
    try:
      if self._pending_step is not None:
        self._finish_pending_save()
    except console.StorageFault:
      if not reported:   # else the fault that stopped the run, reported already
        raise
    finally:
      for writer in (self._metrics_file, self._tb):
        if writer is not None:
          with contextlib.suppress(Exception) if self._faulted else contextlib.nullcontext():
            writer.close()
      self._metrics_file = self._tb = None
