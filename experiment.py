"""The NFNet experiment: train state, device-mapped train/eval steps, EMA, accumulation, SAM.

This is the only module that knows models, data and optimizer together. Device code is written per device,
with pmap's semantics (a leading device axis on the state and batches, collectives over `AXIS`), and
compiled one way for one process and for many (`nfnets.devices`). The train step is the paper's recipe in
four lines: gradients averaged across devices (before AGC, so AGC sees the full batch), `tx.update` of the
configured optax chain, `optax.apply_updates`, the EMA. Before it, each device augments its uint8 batch
(MixUp/CutMix, RandAugment, normalisation: `nfnets.data.device_augment`), so the host only decodes and
resizes. The loop around it (checkpoints, logs, preemption) is `nfnets.trainer.Trainer`.
"""
from typing import Dict, Iterator, Optional

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets
from nfnets import config_validation
from nfnets import data as data_lib
from nfnets import devices as devices_lib
from nfnets import memory
from nfnets import optim
from nfnets import param_groups
from nfnets.data import device_augment
from nfnets.data.normalize import normalize
from nfnets.devices import AXIS, first_local
from nfnets.train_state import TrainState

# fold_in data for the augmentation key of a step: the micro-batch keys use 0..grad_accum_steps (the last one
# SAM's), so a constant far above any accumulation count never gives the model and the augmentation one key.
AUGMENT_STREAM = 0x41554755


def soft_cross_entropy(logits, targets, label_smoothing: float):
  """Mean softmax cross-entropy on (possibly mixed) soft targets, after label smoothing."""
  num_classes = logits.shape[-1]
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Experiment:
  """Owns the compiled steps for one config; the train state it builds is passed in and out.

  Args:
    config: a config from `configs/` (see configs/base.py for every field).
    devices: the devices to map over (default: every device of every process; a subset only in a
      single-process run).
    optimizer: any optax transformation to train with instead of the one `config.optimizer` describes
      (`update` is called with the params).
  """

  def __init__(self, config, devices=None, optimizer: Optional[optax.GradientTransformation] = None):
    self.config = config
    self.mesh = devices_lib.make_mesh(devices)
    self.sharding = devices_lib.device_sharding(self.mesh)
    self.num_devices = self.mesh.devices.size
    self.local_devices = devices_lib.local_device_count(self.mesh)
    # The whole config, before anything is read or compiled (raises ConfigError listing every problem).
    self.info = (config_validation.validate(config, jax.process_count(), self.local_devices)
                 or data_lib.dataset_info(config.dataset))
    if config.training_steps is None:  # from `epochs`; recorded in the config (and so in config.json)
      config.training_steps = config_validation.resolve_training_steps(config, self.info.num_train_examples)
      logging.info('training_steps=%d: %s epochs of %d examples at batch_size %d', config.training_steps,
                   config.epochs, self.info.num_train_examples, config.batch_size)
    self.spec = nfnets.get_spec(config.model.name)
    self.dtype = jnp.dtype(config.dtype)
    self.image_size = config.dataset.image_size or self.spec.train_size
    self.eval_image_size = config.dataset.eval_image_size or self.spec.test_size
    self.micro_batch = config_validation.check_batch_layout(
        config.batch_size, config.grad_accum_steps, jax.process_count(), self.local_devices)
    self.per_device_batch = self.micro_batch * config.grad_accum_steps
    self.net = hk.transform(self._forward)
    self.schedule = optim.make_schedule(config.optimizer, config.batch_size, config.training_steps,
                                        self.info.num_train_examples)
    self.optimizer = optimizer or optim.make_optimizer(config.optimizer, self.schedule)
    self.sam_examples = int(config.optimizer.sam_batch_fraction * self.micro_batch)
    self.augment = self.train_augment()
    per_device = lambda fn, n, donate=(): devices_lib.map_per_device(fn, self.mesh, n, donate)
    # A train step is two programs: the gradients, then the optimizer (see `_optimizer_step`).
    self.jitted_train_step = (per_device(self._gradient_step, 3, donate=(2,)),
                              per_device(self._optimizer_step, 3, donate=(0,)))
    self._compiled_train_steps = {}
    self.eval_step = per_device(self._eval_step, 3)
    self._make_state = per_device(self._fresh_state, 2)
    self._state_around = per_device(self._new_state, 2)
    self._own_copy = per_device(lambda tree: jax.tree.map(jnp.copy, tree), 1)
    self._zeros_like = per_device(lambda tree: jax.tree.map(jnp.zeros_like, tree), 1)

  # ---------------------------------------------------------------- model
  def _forward(self, images, is_training: bool):
    model = nfnets.model_from_config(self.config.model, remat=self.config.remat)
    return model(images, is_training=is_training)

  def _init_params(self, rng):
    dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return self.net.init(rng, dummy, is_training=True)

  def init_params(self, rng):
    return jax.jit(self._init_params)(rng)

  def _new_state(self, params, train_rng) -> TrainState:
    """Per device: step 0, fresh optimizer state, EMA = params. Params and EMA are copied into buffers of
    their own: the train step donates the state, and it cannot write in place into buffers that are views
    of host memory or of one another (on XLA:CPU its first call would then allocate a second state)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      opt_state=self.optimizer.init(params), ema_params=jax.tree.map(jnp.copy, params),
                      rng=train_rng, bad_step=jnp.full((), -1, jnp.int32))

  def _fresh_state(self, init_rng, train_rng) -> TrainState:
    return self._new_state(self._init_params(init_rng), train_rng)

  def init_state(self) -> TrainState:
    """A fresh replicated state: every device holds the same params (same init key), built on the devices."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    return self._make_state(*self.put(devices_lib.replicate((init_rng, train_rng), self.local_devices)))

  def state_from_params(self, params, train_rng=None) -> TrainState:
    """A fresh replicated state around given params (e.g. loaded weights); the rest built on the devices."""
    if train_rng is None:
      train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))[1]
    host = (jax.device_get(params), np.asarray(train_rng))
    return self._state_around(*self.put(devices_lib.replicate(host, self.local_devices)))

  def state_shapes(self) -> TrainState:
    """The unreplicated state's structure as jax.ShapeDtypeStructs (no memory, no compute)."""
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(self._fresh_state, key, key)

  def state_template(self) -> TrainState:
    """An unreplicated host state of zeros with this run's structure, shapes and dtypes (no compute)."""
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.state_shapes())

  def abstract_replicated(self, tree):
    """ShapeDtypeStructs of `tree` (shapes) with the device axis and sharding: lowering the steps with
    these compiles them before any state exists."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.num_devices,) + tuple(x.shape), x.dtype,
                                                       sharding=self.sharding), tree)

  def put(self, local_tree):
    """Global arrays from this process's part of a tree whose leading axis is its local devices."""
    return devices_lib.put(local_tree, self.sharding)

  def put_state(self, host_state: TrainState) -> TrainState:
    """A host (unreplicated) state, e.g. a restored checkpoint, replicated onto the devices in buffers the
    train step can donate: copied once more on the devices (see `_new_state`), before the step's
    temporaries exist."""
    state = self._own_copy(self.put(devices_lib.replicate(host_state, self.local_devices)))
    jax.block_until_ready(state)
    memory.release_free_memory()  # the transferred copy is gone: return its pages before the step runs
    return state

  def compile_train_step(self, state, batch):
    """Compiles the train step's two programs ahead of time for these inputs (arrays or
    ShapeDtypeStructs, with the device axis) and frees what compiling left behind
    (`nfnets.memory.compile_with_low_memory`). Returns `step(state, batch) -> (state, metrics)`."""
    gradient_fn, optimizer_fn = self.jitted_train_step
    lean = lambda fn, *args: memory.compile_with_low_memory(
        fn, *args, cpu_memory_scheduler=self.config.get('cpu_memory_scheduler'))
    compiled_gradient = lean(gradient_fn, state, batch, state.params)  # the gradient has the params' shapes
    compiled_optimizer = lean(optimizer_fn, state, *compiled_gradient.out_info)
    last_grads = []  # each step's gradient is kept to be overwritten by the next one (`_gradient_step`)

    def step(state, batch):
      grad_buffers = last_grads.pop() if last_grads else self._zeros_like(state.params)
      grads, metrics = compiled_gradient(state, batch, grad_buffers)
      new_state = compiled_optimizer(state, grads, metrics)
      last_grads.append(grads)
      return new_state, metrics

    step.programs = (compiled_gradient, compiled_optimizer)
    return step

  def train_step(self, state: TrainState, batch):
    """One optimizer step on the replicated `state` (donated: do not reuse it) and a device batch.
    Returns `(new_state, metrics)`; the metrics have the device axis. Compiled on the first call for each
    batch signature."""
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

  def _batch_gradient(self, params, micro, step_rng):
    """This device's mean loss, top-1 and gradient over its micro-batches (`micro`: [accum, micro, ...])."""
    accum = self.config.grad_accum_steps
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)

    def micro_step(carry, xs):
      i, mb = xs
      (loss, top1), grads = grad_fn(params, mb['images'], mb['labels'], mb['hard_labels'],
                                    jax.random.fold_in(step_rng, i))
      g_acc, l_acc, t_acc = carry
      return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss, t_acc + top1), None

    carry = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0)
    if accum == 1 or jax.default_backend() == 'cpu':
      # XLA:CPU runs convolutions inside a loop body ~10x slower (even a length-1 scan): unroll.
      for i in range(accum):
        carry, _ = micro_step(carry, (i, jax.tree.map(lambda x, i=i: x[i], micro)))
    else:
      carry, _ = jax.lax.scan(micro_step, carry, (jnp.arange(accum), micro))
    # Equal micro-batches: the mean of micro-batch means is the big-batch mean.
    return jax.tree.map(lambda g: g / accum, carry)

  def _sam_point(self, params, micro, rng):
    """SAM's perturbed params, as the paper runs it (App. A.4): the ascent gradient is taken on the first
    `sam_examples` of this device's batch and is not averaged across devices; each device moves its
    params by rho * g / ||g|| (global norm over all params)."""
    part = jax.tree.map(lambda x: x[0, :self.sam_examples], micro)
    (_, _), g = jax.value_and_grad(self._loss, has_aux=True)(
        params, part['images'], part['labels'], part['hard_labels'], rng)
    scale = self.config.optimizer.sam_rho / jnp.maximum(optax.tree.norm(g), 1e-12)
    return optax.tree.add_scale(params, scale, g)

  def _gradient_step(self, state: TrainState, batch: Dict[str, jax.Array], grad_buffers):
    """The first program of a train step: the gradient averaged over all devices, and the metrics.

    `batch`: uint8 `images` and int `labels` (nfnets.data.train_iterator). The whole device batch is
    augmented first, then split into micro-batches, so accumulation sees the same examples as one big batch.
    `grad_buffers`: the previous step's gradient, donated and never read; XLA writes the new gradient
    into its buffers. A fresh params-sized gradient every step left glibc's heap fragmented: F0's peak
    RSS on CPU was 2.71 GiB after 5 steps with fresh outputs, 2.50 GiB with these buffers.
    """
    del grad_buffers
    cfg = self.config
    # A key per step and device (the device index runs over all processes' devices).
    step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
    images, targets, hard = device_augment.augment_batch(
        batch['images'], batch['labels'], jax.random.fold_in(step_rng, AUGMENT_STREAM), **self.augment)
    examples = {'images': images, 'labels': targets, 'hard_labels': hard}
    micro = jax.tree.map(lambda x: x.reshape((cfg.grad_accum_steps, -1) + x.shape[1:]), examples)
    at = state.params
    if cfg.optimizer.sam_rho:
      at = self._sam_point(state.params, micro, jax.random.fold_in(step_rng, cfg.grad_accum_steps))
    grads, loss, top1 = self._batch_gradient(at, micro, step_rng)
    # Average over devices before AGC, so clipping sees the full-batch gradient.
    grads, loss, top1 = jax.lax.pmean((grads, loss, top1), AXIS)

    metrics = {'loss': loss, 'top1': top1, 'lr': self.schedule(state.step),
               'grad_norm': optax.tree.norm(grads), 'clip_fraction': jnp.zeros(())}
    if cfg.optimizer.agc.enabled:
      metrics['clip_fraction'] = nfnets.clip_fraction(
          grads, state.params, cfg.optimizer.agc.clipping, cfg.optimizer.agc.eps,
          mask=param_groups.agc_mask(state.params))
    return grads, metrics

  def _optimizer_step(self, state: TrainState, grads, metrics):
    """The second program of a train step: the configured optax transformation, then the EMA.

    `tx.update` and `optax.apply_updates` on the donated state, guarded: a non-finite loss or gradient
    leaves the state untouched and records the step, so no bad state is ever saved. The guard is a
    `lax.cond`, not `where(finite, new, old)`: with the select, the fusions that write the new params and
    momentum also read the old ones, so XLA copied both first (F0 on CPU: 170 vs 59 ms per call, and a
    params-sized temporary); in a conditional branch they are updated in place.
    """
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])

    def update(state):
      updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      t = state.step.astype(jnp.float32)
      decay = jnp.minimum(self.config.ema_decay, (1.0 + t) / (10.0 + t))
      ema_params = jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), state.ema_params, params)
      return params, opt_state, ema_params

    params, opt_state, ema_params = jax.lax.cond(
        finite, update, lambda state: (state.params, state.opt_state, state.ema_params), state)
    return TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params, rng=state.rng,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))

  def _eval_step(self, params, ema_params, batch):
    """Sums over the global batch (psum) of correct top-1/top-5 and loss, for raw and EMA params, on
    eval crops in 0..255 (normalised here). Top-5 is left out when the model has 5 classes or fewer,
    where it is always 100%."""
    mask = batch['mask']
    out = {'count': jax.lax.psum(jnp.sum(mask), AXIS)}
    for prefix, p in (('', params), ('ema_', ema_params)):
      logits = self.net.apply(p, None, normalize(batch['images']), False).astype(jnp.float32)
      labels = batch['labels']
      per_example = {'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                     'top1': jnp.argmax(logits, -1) == labels}
      if logits.shape[-1] > 5:
        per_example['top5'] = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
      for name, v in per_example.items():
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
    it = data_lib.train_iterator(cfg.dataset, global_batch_size=cfg.batch_size, seed=seed,
                                 num_local_devices=self.local_devices, **self.train_input())
    if start_step and cfg.dataset.exact_resume:
      logging.info('Replaying %d batches to restore the exact data position.', start_step)
      for _ in range(start_step):
        next(it)
    return self._on_devices(it)

  def _on_devices(self, it):
    return data_lib.prefetch_to_device(it, 2, sharding=self.sharding)

  def train_input(self) -> dict:
    """What the host train input needs from the model: image size and class count."""
    return dict(image_size=self.image_size, num_classes=self.config.model.num_classes)

  def train_augment(self) -> dict:
    """`device_augment.augment_batch`'s settings, which the train step applies: the config's MixUp/CutMix
    and RandAugment, with RandAugment's layers and magnitude the config's, else the model's own policy (no
    layers when RandAugment is off). Fake data is not augmented (one-hot targets and normalisation only),
    so a benchmark's step does what timm's does with ready tensors."""
    aug, num_classes = self.config.dataset.augment, self.config.model.num_classes
    if self.config.dataset.name == 'fake':
      return dict(num_classes=num_classes)
    layers = aug.ra_layers if aug.ra_layers is not None else self.spec.ra_layers
    magnitude = aug.ra_magnitude if aug.ra_magnitude is not None else self.spec.ra_magnitude
    return dict(num_classes=num_classes, mixup_alpha=float(aug.mixup_alpha), cutmix=bool(aug.cutmix),
                ra_layers=layers if aug.randaugment else 0, ra_magnitude=float(magnitude), ra_ops=aug.ra_ops)

  def evaluate(self, state: TrainState, image_size: Optional[int] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the whole eval split, for the raw and the EMA params, at `image_size`
    (default: the eval size; the eval preprocessing resizes to it + `dataset.eval_resize_pad`)."""
    cfg = self.config
    image_size = image_size or self.eval_image_size
    it = data_lib.eval_iterator(cfg.dataset, global_batch_size=cfg.eval_batch_size,
                                image_size=image_size, num_local_devices=self.local_devices)
    totals = None
    for batch in self._on_devices(it):
      out = first_local(self.eval_step(state.params, state.ema_params, batch))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    if not totals or totals['count'] == 0:
      raise ValueError(f'Eval split {cfg.dataset.eval_split!r} of {cfg.dataset.name!r} is empty')
    n = totals.pop('count')
    return {k: float(v / n) for k, v in totals.items()} | {'num_examples': int(n), 'image_size': image_size}
