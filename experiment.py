"""The NFNet experiment: train state, device-mapped train/eval steps, EMA, accumulation, checkpoints, logs.

This is the only module that knows models, data and optimizer together. Device code is written per device
and mapped over the devices with pmap semantics (a leading device axis on the state and batches, collectives
over the axis `AXIS`): `jax.pmap`, or for the train step of a single-process run the equivalent
jit(shard_map(vmap)), which XLA can update in place. Gradients are averaged across devices before AGC.
"""
import signal
import time
from typing import Dict, Iterator

from absl import logging
import haiku as hk
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

import nfnets
from nfnets import data as data_lib
from nfnets import memory
from nfnets import optim
from nfnets import param_groups
from nfnets import train_io
from nfnets.train_state import TrainState, replicate, unreplicate

AXIS = 'batch'  # the pmap axis name used by every collective


class NonFiniteLossError(RuntimeError):
  pass


def check_batch_layout(batch_size: int, grad_accum_steps: int, process_count: int,
                       local_devices: int) -> int:
  """Returns the per-device micro-batch size; raises if the global batch does not split evenly."""
  div = process_count * local_devices * grad_accum_steps
  if batch_size < 1 or grad_accum_steps < 1 or batch_size % div:
    raise ValueError(
        f'batch_size={batch_size} must be divisible by processes ({process_count}) x local devices '
        f'({local_devices}) x grad_accum_steps ({grad_accum_steps}) = {div}; '
        f'try batch_size={max(div, batch_size // div * div)}')
  return batch_size // div


def soft_cross_entropy(logits, targets, label_smoothing: float):
  """Mean softmax cross-entropy on (possibly mixed) soft targets, after label smoothing."""
  num_classes = logits.shape[-1]
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Experiment:
  """Owns the train state and the compiled steps for one config.

  Args:
    config: a config from `configs/` (see configs/base.py for every field).
    devices: the local devices to map over (default: all of them).
  """

  def __init__(self, config, devices=None):
    self.config = config
    self.devices = list(devices or jax.local_devices())
    self.spec = nfnets.get_spec(config.model.name)
    self.info = data_lib.dataset_info(config.dataset)
    if config.model.num_classes < 1:
      raise ValueError(f'model.num_classes must be >= 1, got {config.model.num_classes}')
    if config.dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f"dtype {config.dtype!r} not in ('float32', 'bfloat16', 'float16')")
    self.dtype = jnp.dtype(config.dtype)
    self.image_size = config.dataset.image_size or self.spec.train_size
    self.eval_image_size = config.dataset.eval_image_size or self.spec.test_size
    self.local_devices = len(self.devices)
    # The sharding pmap gives its outputs: inputs placed this way run without a second compile.
    self.sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), (AXIS,)),
                                               jax.sharding.PartitionSpec(AXIS))
    self.micro_batch = check_batch_layout(config.batch_size, config.grad_accum_steps,
                                          jax.process_count(), self.local_devices)
    self.per_device_batch = self.micro_batch * config.grad_accum_steps
    try:  # checked now, not at the first eval hours into a run
      check_batch_layout(config.eval_batch_size, 1, jax.process_count(), self.local_devices)
    except ValueError as e:
      raise ValueError(f'eval_batch_size: {e}') from None
    self.net = hk.transform(self._forward)
    self.schedule = optim.make_schedule(config.optimizer, config.batch_size, config.training_steps,
                                        self.info.num_train_examples)
    self.optimizer = optim.make_optimizer(config.optimizer, self.schedule)
    # pmap's `devices` must list every process's devices: given only the local ones, a multi-process
    # pmap reduces over this process alone and the processes silently diverge. None maps over all.
    if jax.process_count() > 1 and self.devices != jax.local_devices():
      raise ValueError(f'A multi-process run maps over all local devices; got devices={self.devices}')
    pmap_devices = self.devices if jax.process_count() == 1 else None
    if jax.process_count() == 1:
      # pmap's semantics and layout (leading device axis, collectives over AXIS) as jit(shard_map(vmap)):
      # pmap squeezes that axis inside, and XLA then copies the donated state buffers instead of updating
      # them in place (F0: +0.13 GiB at the step's peak with the memory scheduler). vmap over the size-1
      # per-device block keeps the buffers' shapes. A multi-process run keeps pmap, which builds the
      # global arrays from each process's local ones.
      spec = jax.sharding.PartitionSpec(AXIS)
      self.jitted_train_step = jax.jit(
          jax.shard_map(jax.vmap(self._train_step), mesh=self.sharding.mesh, in_specs=(spec, spec),
                        out_specs=(spec, spec)),
          donate_argnums=(0,))
    else:
      self.jitted_train_step = jax.pmap(self._train_step, axis_name=AXIS, donate_argnums=(0,),
                                        devices=pmap_devices)
    self._compiled_train_steps = {}
    self.eval_step = jax.pmap(self._eval_step, axis_name=AXIS, devices=pmap_devices)
    self._make_state = jax.pmap(self._fresh_state, axis_name=AXIS, devices=pmap_devices)
    self._state_around = jax.pmap(self._new_state, axis_name=AXIS, devices=pmap_devices)
    self._own_copy = jax.pmap(lambda tree: jax.tree.map(jnp.copy, tree), axis_name=AXIS,
                              devices=pmap_devices)

  # ---------------------------------------------------------------- model
  def _forward(self, images, is_training: bool):
    m = self.config.model
    overrides = dict(stochdepth_rate=m.stochdepth_rate, conv_impl=m.conv_impl, remat=self.config.remat,
                     skip_gain_init=m.skip_gain_init)
    for field in ('drop_rate', 'width', 'depths'):
      if m.get(field) is not None:
        overrides[field] = m[field]
    return nfnets.create_model(m.name, m.num_classes, **overrides)(images, is_training=is_training)

  def _init_params(self, rng):
    dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return self.net.init(rng, dummy, is_training=True)

  def init_params(self, rng):
    return jax.jit(self._init_params)(rng)

  def _new_state(self, params, train_rng) -> TrainState:
    """Per device: step 0, fresh momentum, EMA = params. Params and EMA are copied into buffers of their
    own: the train step donates the state, and it cannot write in place into buffers that are views of
    host memory or of one another (measured on XLA:CPU: its first call then allocates a second state)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      opt_state=self.optimizer.init(params), ema_params=jax.tree.map(jnp.copy, params),
                      rng=train_rng, bad_step=jnp.full((), -1, jnp.int32))

  def _fresh_state(self, init_rng, train_rng) -> TrainState:
    return self._new_state(self._init_params(init_rng), train_rng)

  def init_state(self) -> TrainState:
    """A fresh replicated state: every device holds the same params (same init key), built on the devices."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    return self._make_state(*self.put(replicate((init_rng, train_rng), self.local_devices)))

  def state_from_params(self, params, train_rng=None) -> TrainState:
    """A fresh replicated state around given params (e.g. loaded weights); momentum and EMA built on device."""
    if train_rng is None:
      train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))[1]
    host = (jax.device_get(params), np.asarray(train_rng))
    return self._state_around(*self.put(replicate(host, self.local_devices)))

  def state_shapes(self) -> TrainState:
    """The unreplicated state's structure as jax.ShapeDtypeStructs (no memory, no compute)."""
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(self._fresh_state, key, key)

  def state_template(self) -> TrainState:
    """An unreplicated host state of zeros with this run's structure, shapes and dtypes (no compute)."""
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.state_shapes())

  def abstract_replicated(self, tree):
    """ShapeDtypeStructs of `tree` (shapes) with pmap's leading device axis and sharding: lowering the
    steps with these compiles them before any state exists."""
    n = self.local_devices
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype, sharding=self.sharding),
                        tree)

  def put(self, tree):
    """Places a tree with a leading device axis on this experiment's devices, as pmap shards it."""
    return jax.device_put(tree, self.sharding)

  def put_state(self, host_state: TrainState) -> TrainState:
    """A host (unreplicated) state, e.g. a restored checkpoint, replicated onto the devices in buffers the
    train step can donate: copied once more on the devices, for the reason given in `_new_state` (F0:
    +0.8 GiB at the step's peak otherwise), before the step's temporaries exist."""
    state = jax.block_until_ready(self._own_copy(self.put(replicate(host_state, self.local_devices))))
    memory.release_free_memory()  # the transferred copy is gone: return its pages before the step runs
    return state

  def compile_train_step(self, state, batch):
    """Compiles the train step ahead of time for these inputs (arrays or ShapeDtypeStructs, with the
    device axis), then frees what compiling left behind.

    On CPU, `config.cpu_memory_scheduler` selects XLA's memory-optimized instruction scheduler. After
    compiling, JAX's tracing, lowering and compilation caches are cleared (the returned executable does not
    need them; F0 on CPU: 0.3 GiB of resident memory) and freed heap pages go back to the OS. Other jitted
    functions recompile on their next call.
    """
    options = {}
    if jax.default_backend() == 'cpu' and self.config.get('cpu_memory_scheduler'):
      # (The older boolean xla_cpu_enable_concurrency_optimized_scheduler is accepted here but has no
      # effect in jax 0.10; the enum does.)
      options['xla_cpu_scheduler_type'] = 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
    compiled = self.jitted_train_step.lower(state, batch).compile(compiler_options=options or None)
    memory.drop_compile_caches()
    return compiled

  def train_step(self, state: TrainState, batch):
    """One optimizer step on the replicated `state` (donated: do not reuse it) and a device batch.
    Returns `(new_state, metrics)`; the metrics have the leading device axis. In a single-process run it
    is compiled on the first call for each batch signature (see `compile_train_step`)."""
    if jax.process_count() > 1:
      # pmap's own dispatch: it takes each process's local arrays, where an ahead-of-time compiled pmap
      # expects global ones.
      return self.jitted_train_step(state, batch)
    # The state's signature is fixed by the config (a mismatching state is rejected by the executable),
    # so only the batch's is looked up: a few leaves, not the whole state, on every step.
    key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
    if key not in self._compiled_train_steps:
      self._compiled_train_steps[key] = self.compile_train_step(state, batch)
    return self._compiled_train_steps[key](state, batch)

  # ---------------------------------------------------------------- steps (per device)
  def _loss(self, params, images, targets, hard_labels, rng):
    if self.dtype != jnp.float32:
      params, images = _cast_floats(params, self.dtype), images.astype(self.dtype)
    logits = self.net.apply(params, rng, images, True).astype(jnp.float32)
    loss = soft_cross_entropy(logits, targets, self.config.label_smoothing)
    top1 = jnp.mean(jnp.argmax(logits, -1) == hard_labels)
    return loss, top1

  def _train_step(self, state: TrainState, batch: Dict[str, jax.Array]):
    cfg = self.config
    step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.process_index())
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(AXIS))
    accum = cfg.grad_accum_steps
    micro = jax.tree.map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)

    def micro_step(carry, xs):
      i, mb = xs
      (loss, top1), grads = grad_fn(state.params, mb['images'], mb['labels'], mb['hard_labels'],
                                    jax.random.fold_in(step_rng, i))
      g_acc, l_acc, t_acc = carry
      return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss, t_acc + top1), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    carry = (zeros, 0.0, 0.0)
    if accum == 1 or jax.default_backend() == 'cpu':
      # XLA:CPU runs convolutions inside a loop body ~10x slower (even a length-1 scan): unroll.
      for i in range(accum):
        carry, _ = micro_step(carry, (i, jax.tree.map(lambda x, i=i: x[i], micro)))
    else:
      carry, _ = jax.lax.scan(micro_step, carry, (jnp.arange(accum), micro))
    grads, loss, top1 = carry
    # Equal micro-batches: the mean of micro-batch means is the big-batch mean. Average over devices
    # before AGC so clipping sees the full-batch gradient.
    grads, loss, top1 = jax.lax.pmean(jax.tree.map(lambda g: g / accum, (grads, loss, top1)), AXIS)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state untouched and records the step, so no bad state is saved.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    # The optimizer chain's step in a form XLA updates in place (see optim.apply_step); the EMA reads the
    # params just written, so no old buffer has to outlive its own update.
    params, opt_state = optim.apply_step(cfg.optimizer, self.schedule, grads, state.opt_state,
                                         state.params, keep)
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))
    ema_params = keep(jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), state.ema_params, params),
                      state.ema_params)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema_params,
        rng=state.rng,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    metrics = {'loss': loss, 'top1': top1, 'lr': self.schedule(state.step), 'grad_norm': grad_norm}
    if cfg.optimizer.agc.enabled:
      metrics['clip_fraction'] = nfnets.clip_fraction(
          grads, state.params, cfg.optimizer.agc.clipping, cfg.optimizer.agc.eps,
          mask=param_groups.agc_mask(state.params))
    else:
      metrics['clip_fraction'] = jnp.zeros(())
    return new_state, metrics

  def _eval_step(self, params, ema_params, batch):
    """Sums over the global batch (psum) of correct top-1/top-5 and loss, for raw and EMA params."""
    mask = batch['mask']
    out = {'count': jax.lax.psum(jnp.sum(mask), AXIS)}
    for prefix, p in (('', params), ('ema_', ema_params)):
      logits = self.net.apply(p, None, batch['images'], False).astype(jnp.float32)
      labels = batch['labels']
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
      top1 = jnp.argmax(logits, -1) == labels
      for name, v in (('loss', loss), ('top1', top1), ('top5', top5)):
        out[prefix + name] = jax.lax.psum(jnp.sum(v * mask), AXIS)
    return out

  # ---------------------------------------------------------------- host-side
  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Device batches from step `start_step` on.

    On resume, `dataset.exact_resume` replays the stream up to `start_step` (the order is a pure function
    of the seed, so the run continues exactly as an uninterrupted one; cheap for small data). Otherwise the
    stream is reseeded from (seed, start_step): statistically the same, but not the same examples, and
    no time is spent re-decoding millions of ImageNet images.
    """
    cfg = self.config
    seed = cfg.seed
    if start_step and not cfg.dataset.exact_resume:
      seed = int(np.random.SeedSequence([cfg.seed, start_step]).generate_state(1)[0] % (2 ** 31))
      logging.info('Resuming the data stream with a fresh seed %d (dataset.exact_resume=False).', seed)
    it = data_lib.train_iterator(
        cfg.dataset, global_batch_size=cfg.batch_size, image_size=self.image_size,
        num_classes=cfg.model.num_classes, ra_layers=self._ra_layers(),
        ra_magnitude=cfg.dataset.augment.ra_magnitude or self.spec.ra_magnitude, seed=seed,
        num_local_devices=self.local_devices)
    if start_step and cfg.dataset.exact_resume:
      logging.info('Replaying %d batches to restore the exact data position.', start_step)
      for _ in range(start_step):
        next(it)
    return self._on_devices(it)

  def _on_devices(self, it):
    return data_lib.prefetch_to_device(it, 2, sharding=self.sharding)

  def _ra_layers(self) -> int:
    aug = self.config.dataset.augment
    if not aug.randaugment:
      return 0
    return aug.ra_layers if aug.ra_layers is not None else self.spec.ra_layers

  def evaluate(self, state: TrainState) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole eval split, for the raw and the EMA params."""
    cfg = self.config
    check_batch_layout(cfg.eval_batch_size, 1, jax.process_count(), self.local_devices)
    it = data_lib.eval_iterator(cfg.dataset, global_batch_size=cfg.eval_batch_size,
                                image_size=self.eval_image_size, num_local_devices=self.local_devices)
    totals = None
    for batch in self._on_devices(it):
      out = jax.device_get(unreplicate(self.eval_step(state.params, state.ema_params, batch)))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    if not totals or totals['count'] == 0:
      raise ValueError(f'Eval split {cfg.dataset.eval_split!r} of {cfg.dataset.name!r} is empty')
    n = totals.pop('count')
    return {k: float(v / n) for k, v in totals.items()} | {'num_examples': int(n)}


class Trainer:
  """The training loop around an `Experiment`: checkpoints, logs, preemption and NaN handling."""

  def __init__(self, experiment: Experiment, workdir: str):
    self.xp, self.config, self.workdir = experiment, experiment.config, workdir
    self.io = train_io.RunIO(workdir, self.config, experiment)
    self._stop_requested = False

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing at the end of this step, then exiting.')
    self._stop_requested = True

  def restore_or_init(self) -> TrainState:
    state = self.io.restore(self.xp)
    if state is None:
      if self.config.init_from:
        state = self.io.init_from(self.xp, self.config.init_from)
      else:
        state = self.xp.init_state()
    return state

  def train(self) -> TrainState:
    cfg, xp = self.config, self.xp
    state = self.restore_or_init()
    self.io.write_config()
    step = int(unreplicate(state.step))
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
        fetched = jax.device_get(pending)  # the only host sync: once per log interval
        summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        summary['lr'] = float(np.asarray(fetched[-1]['lr'])[0])
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
    bad = int(unreplicate(state.bad_step))
    if bad >= 0:
      self.io.close()
      raise NonFiniteLossError(
          f'Loss or gradient became NaN/Inf at step {bad}; training stopped. The last good checkpoint '
          f'in {self.io.checkpoint_dir} is kept (latest step: {self.io.latest_step()}).')

  def evaluate_checkpoint(self) -> Dict[str, float]:
    """Evaluates the workdir's latest checkpoint (or `init_from` weights when the workdir has none)."""
    state = self.io.restore(self.xp)
    if state is None:
      if not self.config.init_from:
        raise FileNotFoundError(f'No checkpoint in {self.io.checkpoint_dir} and no config.init_from to '
                                'evaluate; train first or pass --config.init_from=PATH')
      state = self.io.init_from(self.xp, self.config.init_from)
    step = int(unreplicate(state.step))
    metrics = self.xp.evaluate(state)
    self.io.log_eval(step, metrics)
    self.io.close()
    return metrics
