"""train.py end to end: a short demo run, config overrides, eval mode, and bad flags."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ['--config.training_steps=4', '--config.batch_size=16', '--config.log_every=2',
         '--config.eval_every=4', '--config.checkpoint_every=4', '--config.model.conv_impl=xla']


def run_train(*args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  proc = run_train('--config=configs/demo.py', f'--workdir={workdir}', *SHORT,
                   '--config.optimizer.agc.clipping=0.02')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_short_demo_run_logs_and_checkpoints(demo_run):
  workdir, proc = demo_run
  records = read_metrics(workdir)
  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  assert [r['step'] for r in train] == [2, 4]
  for key in ('loss', 'top1', 'lr', 'grad_norm', 'clip_fraction', 'images_per_sec'):
    assert all(isinstance(r[key], float) for r in train), key
  assert len(evals) == 1 and evals[0]['step'] == 4 and evals[0]['num_examples'] == 360
  for key in ('top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss'):
    assert key in evals[0]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert f'Checkpoints: {workdir}/checkpoints' in proc.stdout
  assert 'step 4/4' in proc.stderr and 'ETA' in proc.stderr


def test_overrides_reach_the_experiment(demo_run):
  workdir, _ = demo_run
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['optimizer']['agc']['clipping'] == 0.02
  assert config['batch_size'] == 16 and config['training_steps'] == 4
  # The LR schedule saw the overridden batch: peak = 0.1 * 16 / 256, warmup of 2 epochs of 1437 images.
  lr_at_2 = [r['lr'] for r in read_metrics(workdir) if r['kind'] == 'train'][0]
  assert lr_at_2 == pytest.approx(0.1 * 16 / 256 * 1 / (2 * 1437 / 16), rel=1e-4)


def test_eval_mode_runs_on_the_checkpoint_at_several_sizes(demo_run):
  workdir, _ = demo_run
  before = read_metrics(workdir)[-1]
  proc = run_train('--config=configs/demo.py', f'--workdir={workdir}', *SHORT, '--mode=eval',
                   '--eval_sizes=32,24,48')
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = read_metrics(workdir)[-3:]
  assert [r['kind'] for r in after] == ['eval'] * 3 and {r['step'] for r in after} == {4}
  assert [r['image_size'] for r in after] == [32, 24, 48]
  # At the training run's own eval size, the same numbers as the eval it logged.
  assert after[0]['top1'] == pytest.approx(before['top1']) and after[0]['ema_loss'] == pytest.approx(
      before['ema_loss'], rel=1e-5)
  assert after[1]['ema_loss'] != pytest.approx(after[0]['ema_loss'], rel=1e-4)  # other pixels, other loss
  table = [line for line in proc.stdout.splitlines() if line.startswith('| ')]
  assert len(table) == 4 and table[1].startswith('| 32 | 360 | ')


def test_unknown_config_field_fails_fast(tmp_path):
  proc = run_train('--config=configs/demo.py', f'--workdir={tmp_path}', '--config.optimizer.agc.clip=0.1',
                   timeout=120)
  assert proc.returncode != 0
  assert 'clip' in proc.stderr and not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_eval_mode_without_checkpoint_is_a_clear_error(tmp_path):
  proc = run_train('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=eval', timeout=120)
  assert proc.returncode == 2 and 'no checkpoint in' in proc.stderr and 'Traceback' not in proc.stderr


def make_folder(root, num_classes, per_class=12, size=24):
  """An image folder of `num_classes` classes told apart by colour (cats vs dogs at CPU scale)."""
  rng = np.random.default_rng(num_classes)
  colours = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
  for c in range(num_classes):
    os.makedirs(os.path.join(root, f'class_{c}'))
    for i in range(per_class):
      pixels = np.clip(np.array(colours[c]) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, f'class_{c}', f'{i}.png'))
  return root


@pytest.mark.parametrize('num_classes', [2, 3])
def test_small_folder_dataset_trains_and_evaluates(tmp_path, num_classes):
  """Fewer than 5 classes: training and the eval run end to end; top-5, which means nothing there, is
  left out of the eval (it crashed at the first eval before)."""
  data = make_folder(str(tmp_path / 'data'), num_classes)
  workdir = str(tmp_path / 'run')
  proc = run_train('--config=configs/demo.py', f'--workdir={workdir}', *SHORT,
                   '--config.dataset.name=folder', f'--config.dataset.data_dir={data}',
                   f'--config.model.num_classes={num_classes}', '--config.batch_size=8',
                   '--config.eval_batch_size=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (evaluation,) = [r for r in read_metrics(workdir) if r['kind'] == 'eval']
  assert evaluation['num_examples'] == 2 * num_classes   # every 10th file of each class is held out
  assert 'top5' not in evaluation and 'ema_top5' not in evaluation
  assert 0.0 <= evaluation['top1'] <= 1.0 and np.isfinite(evaluation['loss'])
