"""predict.py on generated images, and fine-tuning from a checkpoint with another class count."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from cli_helpers import ENV
import experiment
from nfnets import trainer as trainer_lib
from tools import predict
from configs import demo, finetune
from nfnets import weights
from nfnets.devices import to_host
from nfnets.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = 'NFNet/~/linear'


# ---------------------------------------------------------------------------------------------------- predict

def random_params(model, num_classes, seed=0):
  """Random params of a registry model's shapes, without compiling its init (gains 1, the rest N(0, 0.1))."""
  rng = np.random.default_rng(seed)
  return {m: {n: (np.ones(shape, np.float32) if 'gain' in n else
                  rng.normal(0, 0.1, shape).astype(np.float32)) for n, shape in ps.items()}
          for m, ps in weights.expected_shapes(model, num_classes).items()}


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
  """A 1000-class nfnet_tiny exported as a flat .npz."""
  path = str(tmp_path_factory.mktemp('weights') / 'tiny.npz')
  weights.export_npz(random_params('nfnet_tiny', 1000), path)
  return path


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """RGB/grayscale/RGBA PNGs and JPEGs of different sizes, and one file that is not an image."""
  d = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  specs = [('rgb.png', 'RGB', (50, 40)), ('rgb.jpg', 'RGB', (64, 48)), ('gray.png', 'L', (33, 33)),
           ('gray.jpg', 'L', (40, 70)), ('rgba.png', 'RGBA', (20, 30))]
  paths = []
  for name, mode, (w, h) in specs:
    channels = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(d / name)
    paths.append(str(d / name))
  (d / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
  return paths, str(d / 'corrupt.png')


def test_class_list_ships_1000_imagenet_names():
  with open(predict.IMAGENET_CLASSES, encoding='utf-8') as f:
    lines = f.read().splitlines()
  assert len(lines) == 1000
  synsets = [line.split('\t')[0] for line in lines]
  assert synsets == sorted(synsets) and len(set(synsets)) == 1000  # ILSVRC index order is sorted synsets
  names = predict.read_class_names(None, 1000)
  assert names[0] == 'tench, Tinca tinca' and names[281] == 'tabby, tabby cat'
  assert names[999] == 'toilet tissue, toilet paper, bathroom tissue' and len(set(names)) == 1000
  assert predict.read_class_names(None, 10) is None


def test_predict_generated_images(tiny_weights, images):
  paths, _ = images
  p = predict.Predictor(tiny_weights, conv_impl='xla')
  # Weights without a run: the model's test size, and the eval pipeline's pad for it (round(32 * 32 / 256)).
  assert (p.model, p.num_classes, p.image_size, p.resize_pad) == ('nfnet_tiny', 1000, 32, 4)
  names = predict.read_class_names(None, p.num_classes)
  results = predict.predict(p, paths, top=5, class_names=names, batch_size=4)  # 2 batches, the last padded
  assert [r['image'] for r in results] == paths
  for r in results:
    probs = [t['probability'] for t in r['top']]
    assert len(r['top']) == 5
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert all(t['label'] == names[t['index']] for t in r['top'])
  # The same image alone (unpadded batch of one) gives the same probabilities.
  alone = predict.predict(p, paths[:1], top=5, class_names=names)[0]
  np.testing.assert_allclose([t['probability'] for t in alone['top']],
                             [t['probability'] for t in results[0]['top']], rtol=1e-4, atol=1e-6)
  text = predict.format_text(results)
  assert text.splitlines()[0] == paths[0] and text.splitlines()[1].startswith('  1. 0.')


def test_predict_bad_inputs(tiny_weights, images, tmp_path):
  paths, corrupt = images
  p = predict.Predictor(tiny_weights, conv_impl='xla')
  missing = str(tmp_path / 'nope.jpg')
  with pytest.raises(predict.ImageError) as err:
    predict.predict(p, [paths[0], missing, corrupt])
  assert len(err.value.problems) == 2 and err.value.problems[0] == f'{missing}: no such file'
  assert err.value.problems[1].startswith(f'{corrupt}: not a readable image (78 bytes; Invalid PNG')
  kept = predict.predict(p, [missing, paths[0], corrupt], skip_bad=True)
  assert [r['image'] for r in kept] == [paths[0]]
  # Wrong variant / class count, missing, truncated weights.
  with pytest.raises(weights.WeightsError, match=r"match model 'F0'.*has 4 blocks, 'F0' has 12"):
    predict.Predictor(tiny_weights, model='F0')
  with pytest.raises(weights.WeightsError, match='(?s)num_classes=10.*wrong shape: NFNet/~/linear/w'):
    predict.Predictor(tiny_weights, num_classes=10)
  with pytest.raises(FileNotFoundError, match='no-weights.npz'):
    predict.Predictor(str(tmp_path / 'no-weights.npz'))
  truncated = tmp_path / 'truncated.npz'
  with open(tiny_weights, 'rb') as f:
    truncated.write_bytes(f.read()[:5000])
  with pytest.raises(weights.WeightsError, match='truncated or corrupt'):
    predict.Predictor(str(truncated))
  with pytest.raises(ValueError, match='3 class names but the model has 1000'):
    (tmp_path / 'three.txt').write_text('a\nb\nc\n')
    predict.read_class_names(str(tmp_path / 'three.txt'), 1000)


def test_predict_cli(tiny_weights, images, tmp_path):
  paths, _ = images
  classes = tmp_path / 'classes.txt'
  classes.write_text(''.join(f'n{i:08d}\tthing {i}\n' for i in range(1000)))
  proc = subprocess.run([sys.executable, '-m', 'tools.predict', f'--weights={tiny_weights}', '--top=3', '--json',
                         f'--classes={classes}', '--conv_impl=xla', *paths[:2]],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert [r['image'] for r in out] == paths[:2]
  assert all(len(r['top']) == 3 and r['top'][0]['label'] == f"thing {r['top'][0]['index']}" for r in out)
  # A missing image fails before the weights are read, with the file named.
  proc = subprocess.run([sys.executable, '-m', 'tools.predict', f'--weights={tiny_weights}', paths[0], 'missing.png'],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip() == 'error: missing.png: no such file' and not proc.stdout


# ---------------------------------------------------------------------------------------------------- fine-tune

def small_config(num_classes, **kw):
  c = demo.get_config()
  c.batch_size = 16
  c.training_steps = 2
  c.eval_batch_size = 40
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 1
  c.model.num_classes = num_classes
  c.model.stochdepth_rate = 0.0
  c.model.drop_rate = 0.0
  c.model.conv_impl = 'xla'
  c.optimizer.warmup_epochs = 0.01
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def xp_of(config):
  return experiment.Experiment(config, devices=jax.local_devices()[:1])


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  """A run's workdir holding a 7-class nfnet_tiny checkpoint at step 2 whose EMA params differ from its params.

  Written by the run's own RunDir.save from arrays made on the host (no compile).
  """
  workdir = str(tmp_path_factory.mktemp('source'))
  config = small_config(7)
  config.dataset.name = 'fake'   # a 7-class model is refused on the 10-class digits; fake data has any count
  xp = xp_of(config)
  params, ema = random_params('nfnet_tiny', 7, seed=1), random_params('nfnet_tiny', 7, seed=2)
  state = TrainState(step=np.asarray(2, np.int32), params=params,
                     opt_state=jax.device_get(xp.optimizer.init(params)), ema_params=ema,
                     rng=np.asarray(jax.random.PRNGKey(0)), bad_step=np.asarray(-1, np.int32))
  trainer = trainer_lib.Trainer(xp, workdir)
  trainer.io.save(2, state)
  trainer.io.close()
  return workdir, ema


def _assert_nothing_written(workdir):
  xp = xp_of(small_config(10))
  assert trainer_lib.Trainer(xp, workdir).io.latest_step() is None
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_finetune_from_checkpoint_with_other_class_count(source_run, tmp_path):
  src, src_ema = source_run
  cfg = small_config(10, init_from=src)
  xp = xp_of(cfg)
  trainer = trainer_lib.Trainer(xp, str(tmp_path))
  start = to_host(trainer.restore_or_init())
  fresh = to_host(xp.init_state())
  assert int(start.step) == 0
  assert np.shape(src_ema[CLASSIFIER]['w'])[-1] == 7 and np.shape(start.params[CLASSIFIER]['w'])[-1] == 10
  for module in start.params:
    for name, x in start.params[module].items():
      want = fresh.params[module][name] if module == CLASSIFIER else src_ema[module][name]
      np.testing.assert_array_equal(x, want, err_msg=f'{module}/{name}')
      np.testing.assert_array_equal(start.ema_params[module][name], want)
  # Two steps on digits; stopping as on a preemption skips the end-of-run eval (and its compile).
  step_fn, calls = xp.train_step, []

  def counting_step(state, batch):
    calls.append(1)
    if len(calls) == 2:
      trainer._on_sigterm(None, None)  # pylint: disable=protected-access
    return step_fn(state, batch)

  xp.train_step = counting_step
  end = to_host(trainer.train())
  assert int(end.step) == 2 and trainer.io.latest_step() == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(end.params))
  moved = np.abs(end.params[CLASSIFIER]['w'] - fresh.params[CLASSIFIER]['w']).max()
  assert moved > 0
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2]
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['init_from'] == src


def test_finetune_without_init_from_warns(tmp_path, caplog):
  cfg = small_config(10, finetune=True)
  xp = xp_of(cfg)
  xp.init_state = lambda: 'random init'   # what would be trained; not compiled here
  with caplog.at_level(logging.WARNING):
    assert trainer_lib.Trainer(xp, str(tmp_path)).restore_or_init() == 'random init'
  assert 'init_from is empty: this fine-tuning run starts from a random init' in caplog.text
  assert '--config.init_from' in caplog.text


def test_finetune_bad_init_from_writes_nothing(source_run, tmp_path):
  src, src_ema = source_run
  cases = {}
  # A missing path or an empty folder is refused by the config check, before anything else.
  cases['missing'] = (str(tmp_path / 'missing.npz'), ValueError, "init_from='.*missing.npz' does not exist")
  cases['empty_dir'] = (str(tmp_path / 'empty'), ValueError, 'holds no checkpoint')
  os.makedirs(tmp_path / 'empty')
  flat = tmp_path / 'src.npz'
  weights.export_npz(src_ema, flat)
  with open(flat, 'rb') as f:
    data = f.read()
  (tmp_path / 'truncated.npz').write_bytes(data[:len(data) // 2])
  cases['truncated'] = (str(tmp_path / 'truncated.npz'), weights.WeightsError, 'truncated or corrupt')
  wrong = {m: dict(ps) for m, ps in src_ema.items()}
  wrong['NFNet/~/final_conv']['w'] = np.zeros((1, 1, 128, 64), np.float32)
  weights.export_npz(wrong, tmp_path / 'wrong.npz')
  cases['wrong_shape'] = (str(tmp_path / 'wrong.npz'), ValueError, r'do not fit.*final_conv/w: shape')
  for name, (path, error, message) in cases.items():
    workdir = str(tmp_path / f'run_{name}')
    with pytest.raises(error, match=message):
      trainer_lib.Trainer(xp_of(small_config(10, init_from=path)), workdir).train()
    _assert_nothing_written(workdir)


def test_finetune_config_follows_the_data():
  """The paper's run on ImageNet (15k steps of 2048, 5k warmup), the same epochs on any other split, and a
  batch no larger than the split."""
  from nfnets import config_validation as cv  # pylint: disable=g-import-not-at-top
  from nfnets.data.info import IMAGENET_TRAIN_EXAMPLES  # pylint: disable=g-import-not-at-top
  c = finetune.get_config()
  assert c.batch_size == 2048 and c.optimizer.base_lr * c.batch_size / 256 == pytest.approx(0.1)   # peak LR
  assert (c.optimizer.weight_decay, c.model.drop_rate, c.model.stochdepth_rate) == (1e-5, 0.25, 0.1)
  assert c.finetune and c.training_steps is None
  assert cv.resolve_training_steps(c, IMAGENET_TRAIN_EXAMPLES) == 15_000
  assert c.optimizer.warmup_epochs * IMAGENET_TRAIN_EXAMPLES / c.batch_size == pytest.approx(5000)
  assert cv.fit_batch_to_data(c, IMAGENET_TRAIN_EXAMPLES, 1, 8) is None and c.batch_size == 2048
  # 45 images, 39 to train on: one batch of 36 on 4 devices (a multiple of them), 24 epochs of it.
  assert cv.fit_batch_to_data(c, 39, 1, 4) == 36 and c.batch_size == 36
  assert cv.resolve_training_steps(c, 39) == 25   # 39 * 23.98 // 36
  d = finetune.get_config('digits')
  assert d.batch_size == 128 and cv.resolve_training_steps(d, 1437) == 269
  assert cv.fit_batch_to_data(d, 1437, 1, 1) is None
  t = finetune.get_config('tiny')
  assert (t.model.name, t.dataset.name, t.dtype, t.dataset.image_size) == ('nfnet_tiny', 'folder', 'float32', 32)
  with pytest.raises(ValueError, match='Unknown config argument'):
    finetune.get_config('flowers')
