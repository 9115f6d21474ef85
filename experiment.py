"""The NFNet experiment: train state, the train and eval steps, EMA, accumulation, SAM.

This is the only module that knows models, data and optimizer together. The train state is a tree of global
arrays replicated over a 1-D mesh of every device; batches are split over the devices along their leading
axis (`nfnets.devices`). Device code is written per device with pmap's semantics (collectives over the one
axis `AXIS`) and compiled as one program for one process and for many.

The train step (`_train_step`) is the paper's recipe, top to bottom: each device augments its uint8 batch
(MixUp/CutMix, RandAugment, normalisation: `nfnets.data.device_augment`), takes the gradient of its
examples (accumulated over micro-batches, at SAM's ascent point when SAM is on), the gradients are
averaged across devices (before AGC, so AGC sees the full batch), then `tx.update` of the configured optax
chain, `optax.apply_updates` and the EMA, guarded so a non-finite step keeps the old state. The loop
around it (checkpoints, logs, preemption) is `nfnets.trainer.Trainer`.
"""
import os
from typing import Dict, Iterator, Optional, Tuple

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets
from nfnets import config_validation
from nfnets import cpu
from nfnets import data as data_lib
from nfnets import devices as devices_lib
from nfnets import optim
from nfnets import param_groups
from nfnets.data import device_augment
from nfnets.data.normalize import normalize
from nfnets.devices import AXIS, REPLICATED, SPLIT
from nfnets.train_state import TrainState

# fold_in data for the augmentation and SAM keys of a step: the micro-batch keys use 0..grad_accum_steps - 1,
# so constants far above any accumulation count never give two uses one key; SAM's does not depend on the
# accumulation count, so an accumulated step is the same step.
AUGMENT_STREAM = 0x41554755
SAM_STREAM = 0x53414D


def soft_cross_entropy(logits, targets, label_smoothing: float):
  """Mean softmax cross-entropy on (possibly mixed) soft targets, after label smoothing."""
  num_classes = logits.shape[-1]
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def sam_ascent_examples(per_device_batch: int, fraction: float) -> np.ndarray:
  """Indices of SAM's ascent examples in a device batch: round(fraction x batch) of them, evenly spread, so
  they cover the MixUp and the CutMix half alike and do not depend on how the batch is accumulated."""
  count = max(1, round(fraction * per_device_batch))
  return (np.arange(count) * per_device_batch) // count


def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` (a restarted run loads its compiled steps instead of
  compiling them again); an empty path turns it off."""
  path = os.path.abspath(os.path.expanduser(path)) if path else None
  if (jax.config.jax_enable_compilation_cache == bool(path)
      and (not path or jax.config.jax_compilation_cache_dir == path)):
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', bool(path))
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
  compilation_cache.reset_cache()   # JAX reads these settings once: make it read them again


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
    self.replicated = jax.sharding.NamedSharding(self.mesh, REPLICATED)
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
    self.sam_examples = sam_ascent_examples(self.per_device_batch, config.optimizer.sam_batch_fraction)
    self.augment = self.train_augment()
    use_compilation_cache(config.compilation_cache_dir)
    # (state, batch) -> (state, metrics): the state donated, its buffers updated in place.
    self.jitted_train_step = devices_lib.map_per_device(
        self._train_step, self.mesh, in_specs=(REPLICATED, SPLIT), out_specs=REPLICATED, donate_argnums=(0,))
    self._compiled_train_steps = {}
    self.eval_step = devices_lib.map_per_device(self._eval_step, self.mesh,
                                                in_specs=(REPLICATED, REPLICATED, SPLIT), out_specs=REPLICATED)

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
    """Step 0, fresh optimizer state, EMA = params, in buffers of its own (the train step donates both)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      opt_state=self.optimizer.init(params), ema_params=jax.tree.map(jnp.copy, params),
                      rng=train_rng, bad_step=jnp.full((), -1, jnp.int32))

  def _fresh_state(self, init_rng, train_rng) -> TrainState:
    return self._new_state(self._init_params(init_rng), train_rng)

  def init_state(self) -> TrainState:
    """A fresh replicated state, built on the devices (every device the same params: one init key)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    return jax.jit(self._fresh_state, out_shardings=self.replicated)(init_rng, train_rng)

  def state_from_params(self, params, train_rng=None) -> TrainState:
    """A fresh replicated state around given params (e.g. loaded weights); the rest built on the devices."""
    if train_rng is None:
      train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))[1]
    placed = devices_lib.put_replicated((jax.device_get(params), np.asarray(train_rng)), self.mesh)
    return jax.jit(self._new_state, out_shardings=self.replicated)(*placed)

  def state_shapes(self) -> TrainState:
    """The state's structure as replicated jax.ShapeDtypeStructs (no memory, no compute): lowering the
    steps with these compiles them before any state exists."""
    key = jax.random.PRNGKey(0)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        jax.eval_shape(self._fresh_state, key, key))

  def state_template(self) -> TrainState:
    """A host state of zeros with this run's structure, shapes and dtypes (no compute)."""
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), self.state_shapes())

  def put_batch(self, local_batch):
    """Global arrays from this process's part of a batch (leading axis: its examples)."""
    return devices_lib.put_batch(local_batch, self.mesh)

  def put_state(self, host_state: TrainState) -> TrainState:
    """A host state (e.g. a restored checkpoint) replicated onto the devices, in buffers the train step can
    donate."""
    return devices_lib.put_replicated(host_state, self.mesh)

  def compile_train_step(self, state, batch):
    """Compiles the train step ahead of time for these inputs (arrays, or ShapeDtypeStructs with their
    shardings). Returns `step(state, batch) -> (state, metrics)`."""
    compiled = self.jitted_train_step.lower(state, batch).compile(
        cpu.compiler_options(self.config.cpu_memory_scheduler))
    cpu.after_compile()
    return compiled

  def train_step(self, state: TrainState, batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
    """One optimizer step on the replicated `state` (donated: do not reuse it) and a global batch.
    Compiled on the first call for each batch signature."""
    # The state's signature is fixed by the config (a mismatching state is rejected by the executable),
    # so only the batch's is looked up: a few leaves, not the whole state, on every step.
    key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
    if key not in self._compiled_train_steps:
      self._compiled_train_steps[key] = self.compile_train_step(state, batch)
    return self._compiled_train_steps[key](state, batch)

  # ---------------------------------------------------------------- steps (per device)
  def _train_step(self, state: TrainState, batch: Dict[str, jax.Array]) -> Tuple[TrainState, dict]:
    """One optimizer step, on one device's slice of the batch: uint8 `images` and int `labels`
    (nfnets.data.train_iterator). Returns the new state and the step's metrics, both the same on every
    device."""
    cfg = self.config
    # A key per step and device (the device index runs over all processes' devices).
    step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
    # The whole device batch is augmented first (MixUp/CutMix pair examples across it), then split into
    # micro-batches, so accumulation sees the same examples as one big batch.
    images, targets, hard = device_augment.augment_batch(
        batch['images'], batch['labels'], jax.random.fold_in(step_rng, AUGMENT_STREAM), **self.augment)
    examples = {'images': images, 'labels': targets, 'hard_labels': hard}
    at = state.params
    if cfg.optimizer.sam_rho:
      at = self._sam_point(state.params, examples, jax.random.fold_in(step_rng, SAM_STREAM))
    grads, loss, top1 = self._batch_gradient(at, examples, step_rng)
    # Averaged over devices before AGC, so clipping sees the full-batch gradient (as the reference code).
    grads, loss, top1 = jax.lax.pmean((grads, loss, top1), AXIS)
    metrics = {'loss': loss, 'top1': top1, 'lr': self.schedule(state.step),
               'grad_norm': optax.tree.norm(grads), 'clip_fraction': jnp.zeros(())}
    if cfg.optimizer.agc.enabled:
      metrics['clip_fraction'] = nfnets.clip_fraction(
          grads, state.params, cfg.optimizer.agc.clipping, cfg.optimizer.agc.eps,
          mask=param_groups.agc_mask(state.params))

    def update(state):
      updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      t = state.step.astype(jnp.float32)
      decay = jnp.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))
      ema_params = jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), state.ema_params, params)
      return params, opt_state, ema_params

    # A non-finite loss or gradient leaves the state untouched and records the step, so no bad state is
    # ever saved. A conditional rather than `where(finite, new, old)`: the update is skipped, not computed
    # and thrown away, and every buffer of the donated state is written in place.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    params, opt_state, ema_params = jax.lax.cond(
        finite, update, lambda state: (state.params, state.opt_state, state.ema_params), state)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params, rng=state.rng,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    return new_state, metrics

  def _loss(self, params, images, targets, hard_labels, rng):
    if self.dtype != jnp.float32:
      params, images = _cast_floats(params, self.dtype), images.astype(self.dtype)
    logits = self.net.apply(params, rng, images, True).astype(jnp.float32)
    loss = soft_cross_entropy(logits, targets, self.config.label_smoothing)
    top1 = jnp.mean(jnp.argmax(logits, -1) == hard_labels)
    return loss, top1

  def _batch_gradient(self, params, examples, step_rng):
    """This device's mean loss, top-1 and gradient over its examples, in `grad_accum_steps` micro-batches."""
    accum = self.config.grad_accum_steps
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)

    def micro_step(i, mb):
      (loss, top1), grads = grad_fn(params, mb['images'], mb['labels'], mb['hard_labels'],
                                    jax.random.fold_in(step_rng, i))
      return grads, loss, top1

    if accum == 1:
      return micro_step(0, examples)
    micro = jax.tree.map(lambda x: x.reshape((accum, -1) + x.shape[1:]), examples)

    def add(total, xs):
      return jax.tree.map(jnp.add, total, micro_step(*xs)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro), unroll=cpu.loop_unroll())
    # Equal micro-batches: the mean of micro-batch means is the big-batch mean.
    return jax.tree.map(lambda x: x / accum, total)

  def _sam_point(self, params, examples, rng):
    """SAM's perturbed params, as the paper runs it (App. A.4): the ascent gradient is taken on
    `sam_batch_fraction` of this device's batch (spread over it: `sam_ascent_examples`) and is not
    averaged across devices; each device moves its params by rho * g / ||g|| (global norm)."""
    part = jax.tree.map(lambda x: x[self.sam_examples], examples)
    (_, _), g = jax.value_and_grad(self._loss, has_aux=True)(
        params, part['images'], part['labels'], part['hard_labels'], rng)
    scale = self.config.optimizer.sam_rho / jnp.maximum(optax.tree.norm(g), 1e-12)
    return optax.tree.add_scale(params, scale, g)

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
    """Device batches from step `start_step` on. The global batch at a step is a function of (seed, step)
    (nfnets.data), so a resumed run reads at once exactly what the uninterrupted run would have."""
    cfg = self.config
    it = data_lib.train_iterator(cfg.dataset, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                 start_step=start_step, **self.train_input())
    return self._on_devices(it)

  def _on_devices(self, it):
    """This process's batch slices as the steps' global arrays, two batches ahead of the step."""
    return devices_lib.prefetch(it, self.mesh, 2)

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
    it = data_lib.eval_iterator(cfg.dataset, global_batch_size=cfg.eval_batch_size, image_size=image_size)
    totals = None
    for batch in self._on_devices(it):
      out = devices_lib.to_host(self.eval_step(state.params, state.ema_params, batch))
      totals = out if totals is None else {k: totals[k] + out[k] for k in out}
    if not totals or totals['count'] == 0:
      raise ValueError(f'Eval split {cfg.dataset.eval_split!r} of {cfg.dataset.name!r} is empty')
    n = totals.pop('count')
    return {k: float(v / n) for k, v in totals.items()} | {'num_examples': int(n), 'image_size': image_size}
