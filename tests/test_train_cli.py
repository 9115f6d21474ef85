"""train.py end to end: a short demo run, config overrides, eval mode, and bad flags."""
import json
import os
import re
import subprocess
import sys

import math

import numpy as np
from PIL import Image
import pytest

from cli_helpers import ENV, ROOT, TRAIN, console_lines

# The shared 4-step run's flags (cli_helpers.TRAIN: one compiled program for several modules), logging
# every 2 steps (a host-side setting: the same programs).
SHORT = TRAIN + ['--config.log_every=2']


def run_train(*args, timeout=600):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo'))
  proc = run_train('--config=configs/demo.py', f'--workdir={workdir}', *SHORT)
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
  assert config['log_every'] == 2 and config['optimizer']['warmup_epochs'] == 0.01
  assert config['batch_size'] == 16 and config['training_steps'] == 4
  # The LR schedule saw the overridden batch and warmup: peak 0.1 * 16 / 256, a warmup of 0.01 epochs of
  # 1437 images (0.898 steps), then the cosine; the step-2 record holds the LR of step index 1.
  peak, warmup = 0.1 * 16 / 256, 0.01 * 1437 / 16
  lr_at_2 = [r['lr'] for r in read_metrics(workdir) if r['kind'] == 'train'][0]
  assert lr_at_2 == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * (1 - warmup) / (4 - warmup))), rel=1e-4)


def test_eval_mode_needs_only_the_workdir(demo_run):
  """The run's config.json is the config (its overrides included); each size is its own series."""
  workdir, _ = demo_run
  before = read_metrics(workdir)
  proc = run_train(f'--workdir={workdir}', '--mode=eval', '--eval_sizes=32,24,48')
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = read_metrics(workdir)
  assert after[:len(before)] == before
  new = after[len(before):]
  assert [r['kind'] for r in new] == ['eval_32px', 'eval_24px', 'eval_48px'] and {r['step'] for r in new} == {4}
  assert [r['image_size'] for r in new] == [32, 24, 48]
  # At the training run's own eval size, the same numbers as the eval it logged.
  own = before[-1]
  assert own['kind'] == 'eval' and new[0]['top1'] == pytest.approx(own['top1'])
  assert new[0]['ema_loss'] == pytest.approx(own['ema_loss'], rel=1e-5)
  assert new[1]['ema_loss'] != pytest.approx(new[0]['ema_loss'], rel=1e-4)  # other pixels, other loss
  table = [line for line in proc.stdout.splitlines() if line.startswith('| ')]
  assert len(table) == 4 and table[1].startswith('| 32 | 360 | ')


def test_saved_config_json_works_as_config(demo_run, tmp_path):
  """A run's config.json as --config of another workdir: its weights evaluated through init_from give the
  run's own EMA numbers (init_from loads the EMA params)."""
  workdir, _ = demo_run
  proc = run_train(f'--config={workdir}/config.json', f'--workdir={tmp_path}/copy', '--mode=eval',
                   f'--config.init_from={workdir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (copy,) = read_metrics(f'{tmp_path}/copy')
  own = [r for r in read_metrics(workdir) if r['kind'] == 'eval'][0]
  assert copy['kind'] == 'eval_32px' and copy['top1'] == pytest.approx(own['ema_top1'])
  assert f'Config {workdir}/config.json; overrides init_from=' in proc.stderr


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


def test_small_folder_dataset_trains_and_evaluates(tmp_path):
  """Fewer than 5 classes: training and the eval run end to end; top-5, which means nothing there, is
  left out of the eval (it crashed at the first eval before)."""
  data = make_folder(str(tmp_path / 'data'), 2)
  workdir = str(tmp_path / 'run')
  proc = run_train('--config=configs/demo.py', f'--workdir={workdir}', *SHORT,
                   '--config.dataset.name=folder', f'--config.dataset.data_dir={data}',
                   '--config.model.num_classes=2', '--config.batch_size=8', '--config.eval_batch_size=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  (evaluation,) = [r for r in read_metrics(workdir) if r['kind'] == 'eval']
  assert evaluation['num_examples'] == 4   # every 10th file of each class is held out
  assert 'top5' not in evaluation and 'ema_top5' not in evaluation
  assert 0.0 <= evaluation['top1'] <= 1.0 and np.isfinite(evaluation['loss'])


def test_folder_fine_tune_from_the_demo_run_predicts_class_names(demo_run, tmp_path):
  """configs/finetune.py:tiny from a demo run on a 3-class folder: the batch shrinks to the 30 train
  images (a multiple of the devices), the run lasts its epochs of them, and tools.predict names the
  classes by their folders."""
  demo, _ = demo_run
  data = make_folder(str(tmp_path / 'data'), 3)
  workdir = str(tmp_path / 'ft')
  # SAM off: this is about the data and the names, and the step compiles in half the time without it.
  proc = run_train('--config=configs/finetune.py:tiny', f'--workdir={workdir}', f'--config.init_from={demo}',
                   f'--config.dataset.data_dir={data}', '--config.model.num_classes=3', '--config.epochs=2',
                   '--config.model.conv_impl=xla', '--config.optimizer.sam_rho=0',
                   '--config.optimizer.warmup_epochs=0.5')   # 2 steps: past the warmup, no warning
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  devices = int(re.search(r'(\d+) local device', proc.stderr).group(1))
  assert config['batch_size'] == 30 // devices * devices and config['training_steps'] == 60 // config['batch_size']
  assert f'batch_size=2048 is more than the 30 train examples: batch_size={config["batch_size"]}' in proc.stderr
  assert 'init_from is empty' not in proc.stderr
  (evaluation,) = [r for r in read_metrics(workdir) if r['kind'] == 'eval']
  assert evaluation['num_examples'] == 6 and 'top5' not in evaluation
  image = os.path.join(data, 'class_1', '5.png')
  predicted = subprocess.run([sys.executable, '-m', 'tools.predict', f'--weights={workdir}', '--json', image],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  (result,) = json.loads(predicted.stdout)
  assert sorted(t['label'] for t in result['top']) == ['class_0', 'class_1', 'class_2']
  assert [t['label'] for t in result['top']] == [f"class_{t['index']}" for t in result['top']]
  preview = subprocess.run([sys.executable, '-m', 'tools.preview_augmentation', f'--workdir={workdir}',
                            '--num=4'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert preview.returncode == 0, preview.stderr[-3000:]
  assert preview.stdout == f'Wrote 4 images to {workdir}/augmentation.png\n'
  ours, others = console_lines(preview.stderr)
  # The config it read and the data it draws from, nothing else.
  assert not others and len(ours) == 2, preview.stderr
  assert f'Config {workdir}/config.json' in ours[0] and 'Dataset folder: 30 train examples' in ours[1], ours
  assert os.path.getsize(os.path.join(workdir, 'augmentation.png')) > 5000


def test_preview_titles_name_the_classes():
  from tools import preview_augmentation  # pylint: disable=g-import-not-at-top
  target = np.array([0.0, 0.7, 0.3])
  assert preview_augmentation.title(target, ['cat', 'dog', 'fox']) == 'dog:0.70 + fox:0.30'
  assert preview_augmentation.title(target) == '1:0.70 + 2:0.30'
