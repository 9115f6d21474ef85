"""The device-mapped train step: 1 vs 4 devices, accumulation vs big batch, resume vs uninterrupted, NaN stop."""
import functools
import importlib.util
import json
import os
import shutil

import jax
from jax.sharding import NamedSharding
import numpy as np
import pytest

from configs import demo
import experiment
from nfnets import cpu
from nfnets import devices
from nfnets import trainer as trainer_lib
from nfnets.data import device_augment
from nfnets.data import normalize
from nfnets.devices import AXIS, REPLICATED, SPLIT, to_host


# The smallest registry network the config can name (4 bottleneck blocks, 34k params): what the tests that
# train it compare (device layouts, accumulation, resume, SAM, the guard, processes) does not depend on the
# model, and its step compiles in ~60% of nfnet_tiny's time. The NFNet trains end to end in the CLI tests.
SMALL_NF_RESNET = {'model.name': 'nf_resnet26', 'model.width': 0.25, 'model.depths': (1, 1, 1, 1)}
# The demo's network, for the tests whose figures depend on the model.
NFNET_TINY = {'model.name': 'nfnet_tiny', 'model.width': None, 'model.depths': None}


def tiny_config(**kw):
  c = demo.get_config()
  c.dataset.name = 'digits'
  c.batch_size = 16
  c.training_steps = 20
  c.eval_batch_size = 40
  c.model.stochdepth_rate = 0.0  # deterministic forward, so device layouts can be compared exactly
  c.model.conv_impl = 'xla'  # compiles faster; every lowering is tested equal in test_conv
  c.model.drop_rate = 0.0
  c.optimizer.warmup_epochs = 0.01
  c.optimizer.base_lr = 0.4
  c.log_every = 2
  c.eval_every = 0
  c.checkpoint_every = 3
  for k, v in {**SMALL_NF_RESNET, **kw}.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


@functools.cache
def shared_experiment(num_devices: int) -> experiment.Experiment:
  """The tiny config's Experiment on the first `num_devices` devices, built once per test process: the
  tests that only read it share its traced and compiled programs (the suite is compile-bound)."""
  return experiment.Experiment(tiny_config(), devices=jax.local_devices()[:num_devices])


def fake_batch(n_devices, per_device, size=32, num_classes=10, seed=0, dtype=np.uint8):
  """A host train batch as the input pipeline gives it: pixels 0..255 and int labels, n_devices x
  per_device examples (device d's slice is [d * per_device, (d + 1) * per_device))."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n_devices * per_device, size, size, 3)).astype(dtype)
  labels = rng.integers(0, num_classes, size=(n_devices * per_device,)).astype(np.int32)
  return {'images': images, 'labels': labels}


def loss_inputs(batch, device, num_devices=1, num_classes=10):
  """(normalised images, one-hot targets, labels) of one device's slice of the batch: what the step trains
  on when nothing is augmented (the tiny config's digits recipe; test_device_augment checks that path)."""
  part = slice(device * len(batch['labels']) // num_devices, (device + 1) * len(batch['labels']) // num_devices)
  labels = batch['labels'][part]
  return normalize.normalize(batch['images'][part]), np.eye(num_classes, dtype=np.float32)[labels], labels


def run_steps(xp, steps=2, seed=0):
  state = xp.init_state()
  n = xp.local_devices
  for i in range(steps):
    state, metrics = xp.train_step(state, xp.put_batch(fake_batch(n, xp.per_device_batch, seed=seed + i)))
  return to_host(state), to_host(metrics)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_one_device_equals_four_devices():
  assert jax.local_device_count() == 4, 'run with XLA_FLAGS=--xla_force_host_platform_device_count=4'
  xp4 = shared_experiment(4)
  s1, m1 = run_steps(shared_experiment(1))
  s4, m4 = run_steps(xp4)
  assert_trees_close(s1.params, s4.params)
  assert_trees_close(s1.ema_params, s4.ema_params)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  # The update actually moved the params (LR > 0 after the first step).
  init = to_host(xp4.init_state())
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s4.params),
                                                          jax.tree.leaves(init.params)))
  assert moved > 1e-4


def test_device_built_state_equals_host_built_state():
  """init_state (built on the devices) and state_from_params (host params, transferred and copied) agree
  exactly, and both train to the same params: the two ways a run starts are the same run."""
  xp = shared_experiment(2)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(xp.config.seed))
  on_device = xp.init_state()
  from_host = xp.state_from_params(xp.init_params(init_rng), train_rng)
  a, b = to_host(on_device), to_host(from_host)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a.bad_step) == -1 and int(a.step) == 0
  # The EMA starts equal to the params but in its own buffers (both are donated to the step).
  leaf = lambda t: jax.tree.leaves(t)[0].addressable_shards[0].data
  assert leaf(on_device.params).unsafe_buffer_pointer() != leaf(on_device.ema_params).unsafe_buffer_pointer()
  batch = xp.put_batch(fake_batch(2, xp.per_device_batch))
  s1, _ = xp.train_step(on_device, batch)
  s2, _ = xp.train_step(from_host, batch)
  assert_trees_close(to_host(s1).params, to_host(s2).params, rtol=0, atol=0)


def test_accumulation_equals_big_batch():
  """With the F0 recipe's MixUp, CutMix and RandAugment on: the step augments the whole device batch, then
  splits it."""
  devices = jax.local_devices()[:2]
  mixing = {'dataset.augment.mixup_alpha': 0.2, 'dataset.augment.cutmix': True,
            'dataset.augment.randaugment': True, 'dataset.augment.ra_layers': 2,
            'dataset.augment.ra_magnitude': 5}
  big = experiment.Experiment(tiny_config(**mixing), devices=devices)
  acc = experiment.Experiment(tiny_config(grad_accum_steps=4, **mixing), devices=devices)
  assert acc.micro_batch * 4 == big.micro_batch == 8
  s_big, m_big = run_steps(big)
  s_acc, m_acc = run_steps(acc)
  assert_trees_close(s_big.params, s_acc.params)
  np.testing.assert_allclose(m_big['grad_norm'], m_acc['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m_big['clip_fraction'], m_acc['clip_fraction'])


def test_metrics_and_ema():
  xp = shared_experiment(1)
  state0 = to_host(xp.init_state())
  s, m = run_steps(xp, steps=1)
  assert set(m) == {'loss', 'top1', 'lr', 'grad_norm', 'clip_fraction'}
  assert 0 <= m['clip_fraction'] <= 1 and m['grad_norm'] > 0 and m['lr'] == 0.0  # LR is 0 at step 0
  # EMA at t=0: decay = min(ema_decay, (1 + t) / (10 + t)) = 0.1 -> ema = 0.1 * init + 0.9 * params
  for e, p0, p in zip(jax.tree.leaves(s.ema_params), jax.tree.leaves(state0.params),
                      jax.tree.leaves(s.params)):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p, rtol=1e-5, atol=1e-7)
  assert int(s.step) == 1


@pytest.mark.parametrize('batch,accum,message', [(10, 1, 'must be divisible'), (16, 3, 'must be divisible'),
                                                 (0, 1, 'must be an integer >= 1')])
def test_bad_batch_layout(batch, accum, message):
  with pytest.raises(ValueError, match=f'batch_size={batch} {message}'):
    experiment.Experiment(tiny_config(batch_size=batch, grad_accum_steps=accum))


def test_model_shape_overrides_reach_the_model():
  """config.model.width / depths / skip_gain_init (the AGC study's small NF-ResNet) build that model."""
  cfg = tiny_config(**{'model.name': 'nf_resnet26', 'model.width': 0.5, 'model.depths': (1, 2, 1, 1),
                       'model.skip_gain_init': 1.0})
  params = experiment.Experiment(cfg).state_template().params
  blocks = sorted(m for m in params if m.count('/') == 2 and 'nf_res_block' in m)
  assert len(blocks) == 5  # 1 + 2 + 1 + 1
  assert params['NF_ResNet/~/initial_conv']['w'].shape == (7, 7, 3, 8)    # 16 * 0.5
  assert params['NF_ResNet/~/linear']['w'].shape == (256, 10)             # 512 * 0.5
  fresh = experiment.Experiment(cfg).init_params(jax.random.PRNGKey(0))
  assert {float(fresh[b]['skip_gain']) for b in blocks} == {1.0}


def _train(cfg, workdir, stop_after=None):
  xp = experiment.Experiment(cfg, devices=jax.local_devices()[:2])
  trainer = trainer_lib.Trainer(xp, str(workdir))
  if stop_after is not None:
    step_fn, calls = xp.train_step, []

    def counting_step(state, batch):
      calls.append(1)
      if len(calls) == stop_after:
        trainer._on_sigterm(None, None)  # what a preemption's SIGTERM does
      return step_fn(state, batch)

    xp.train_step = counting_step
  return to_host(trainer.train()), trainer


def test_resume_reproduces_uninterrupted_run(tmp_path):
  cfg = tiny_config(checkpoint_every=100)  # the shared Experiment's programs: 20 steps
  full, _ = _train(cfg, tmp_path / 'full')
  part, trainer = _train(cfg, tmp_path / 'resumed', stop_after=5)
  assert int(part.step) == 5 and trainer.io.latest_step() == 5  # checkpoint written on SIGTERM
  resumed, _ = _train(cfg, tmp_path / 'resumed')
  assert int(resumed.step) == cfg.training_steps
  for a, b in zip(jax.tree.leaves((full.params, full.ema_params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.ema_params, resumed.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_saved_with_a_device_axis_restores_unchanged(tmp_path):
  """A run directory written when the train state carried a device axis (tests/fixtures/checkpoint_v1, made
  by tests/fixtures/make_checkpoint_v1.py at commit ddd7a6a) resumes with today's replicated state: every
  leaf as it was saved, and training goes on from step 2."""
  fixtures = os.path.join(os.path.dirname(__file__), 'fixtures')
  spec = importlib.util.spec_from_file_location('make_checkpoint_v1', os.path.join(fixtures, 'make_checkpoint_v1.py'))
  maker = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(maker)
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(fixtures, 'checkpoint_v1'), workdir)
  xp = experiment.Experiment(tiny_config(**dict(maker.OVERRIDES, training_steps=3)), devices=jax.local_devices()[:2])
  trainer = trainer_lib.Trainer(xp, str(workdir))
  restored = to_host(xp.put_state(trainer.io.restore(xp.state_template())))
  saved = json.load(open(workdir / 'leaf_sums.json'))
  got = {jax.tree_util.keystr(path): [float(np.sum(np.asarray(x, np.float64))),
                                      float(np.sum(np.square(np.asarray(x, np.float64))))]
         for path, x in jax.tree_util.tree_leaves_with_path(restored)}
  assert got.keys() == saved.keys() and len(got) > 100
  for key, sums in saved.items():
    assert got[key] == sums, key
  assert int(restored.step) == 2
  state = to_host(trainer.train())
  assert int(state.step) == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_incompatible_workdir_is_refused(tmp_path):
  cfg = tiny_config(checkpoint_every=100)  # the shared Experiment's programs
  _train(cfg, tmp_path)
  other = tiny_config()
  other.model.width = 2.0
  with pytest.raises(ValueError, match='incompatible.*params with other names/shapes'):
    _train(other, tmp_path)


def test_nan_stops_training_and_keeps_good_checkpoint(tmp_path):
  cfg = tiny_config(training_steps=30, checkpoint_every=1, log_every=1)
  cfg.optimizer.agc.enabled = False
  cfg.optimizer.base_lr = 1e30
  with pytest.raises(trainer_lib.NonFiniteLossError, match='NaN/Inf at step') as err:
    _train(cfg, tmp_path)
  xp = experiment.Experiment(cfg, devices=jax.local_devices()[:2])
  trainer = trainer_lib.Trainer(xp, str(tmp_path))
  last = trainer.io.latest_step()
  assert last is not None and last < 30 and f'latest step: {last}' in str(err.value)
  state = trainer.io.restore(xp.state_template())
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_eval_counts_every_example_for_raw_and_ema():
  """The device-mapped eval (padded, masked, summed over devices) equals a plain host loop over the split,
  for the raw and the EMA params, which differ after a few steps."""
  from nfnets import data  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(eval_batch_size=64)  # the digits test split is not a multiple of 64
  xp = experiment.Experiment(cfg, devices=jax.local_devices()[:2])
  state = xp.init_state()
  for seed in range(3):
    state, _ = xp.train_step(state, xp.put_batch(fake_batch(2, xp.per_device_batch, seed=seed)))
  metrics = xp.evaluate(state)
  host = to_host(state)
  count, correct, loss = 0.0, {'': 0.0, 'ema_': 0.0}, {'': 0.0, 'ema_': 0.0}
  for batch in data.eval_iterator(cfg.dataset, global_batch_size=64, image_size=xp.eval_image_size):
    images, labels, mask = batch['images'], batch['labels'], batch['mask']
    count += mask.sum()
    for prefix, params in (('', host.params), ('ema_', host.ema_params)):
      logits = np.asarray(xp.net.apply(params, None, normalize.normalize(images), False), np.float64)
      log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
          - logits.max(-1, keepdims=True)
      correct[prefix] += np.sum((logits.argmax(-1) == labels) * mask)
      loss[prefix] -= np.sum(log_p[np.arange(len(labels)), labels] * mask)
  assert metrics['num_examples'] == count == data.dataset_info(cfg.dataset).num_eval_examples
  for prefix in ('', 'ema_'):
    assert metrics[prefix + 'top1'] == pytest.approx(correct[prefix] / count)
    assert metrics[prefix + 'loss'] == pytest.approx(loss[prefix] / count, rel=1e-4)
    assert 0.0 <= metrics[prefix + 'top5'] <= 1.0 and metrics[prefix + 'top5'] >= metrics[prefix + 'top1']
  # The two param sets really differ, so each was evaluated on its own.
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(host.params),
                                                         jax.tree.leaves(host.ema_params))) > 1e-4
  assert metrics['loss'] != metrics['ema_loss']


def test_train_step_updates_the_donated_state_in_place(num_devices=2):
  """The one-program train step writes the new params, optimizer state and EMA into the donated buffers
  (no second state is allocated) and copies none of them first: beyond what the gradient alone needs, its
  temporaries hold the gradient and little more (copies of the old params and momentum would be two
  params' worth). On nfnet_tiny, whose params outweigh its activations at this batch (the test's NF-ResNet's
  do not, so a copy of them would hide among the activations)."""
  xp = experiment.Experiment(tiny_config(**NFNET_TINY), devices=jax.local_devices()[:num_devices])
  shapes = xp.state_shapes()
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(xp.mesh, SPLIT)),
                       fake_batch(num_devices, xp.per_device_batch))
  step = xp.compile_train_step(shapes, batch).memory_analysis()   # per device

  def gradient_only(state, batch):
    images, targets, hard = device_augment.augment_batch(batch['images'], batch['labels'], state.rng,
                                                         **xp.augment)
    examples = {'images': images, 'labels': targets, 'hard_labels': hard}
    return jax.lax.pmean(xp._batch_gradient(state.params, examples, state.rng)[0], AXIS)

  gradient = devices.map_per_device(gradient_only, xp.mesh, (REPLICATED, SPLIT), REPLICATED).lower(
      shapes, batch).compile(cpu.compiler_options(True)).memory_analysis()
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  assert step.alias_size_in_bytes == nbytes(shapes)
  assert step.temp_size_in_bytes < gradient.temp_size_in_bytes + 1.5 * nbytes(shapes.params)


def test_train_step_compiles_once_per_input_signature():
  xp = experiment.Experiment(tiny_config(), devices=jax.local_devices()[:1])
  state = xp.init_state()
  for seed in range(3):
    state, _ = xp.train_step(state, xp.put_batch(fake_batch(1, xp.per_device_batch, seed=seed)))
  assert len(xp._compiled_train_steps) == 1  # pylint: disable=protected-access
