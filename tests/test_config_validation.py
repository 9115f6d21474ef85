"""Config validation up front (nfnets/config_validation.py) and train.py's clean user errors and console."""
import logging as std_logging
import os
import subprocess
import sys

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest

import cli_helpers
from configs import base, demo, f0
from nfnets import config_validation as cv
from nfnets.data.info import IMAGENET_TRAIN_EXAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_field(config, path, value):
  *parents, last = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[last] = value


def problems(overrides=(), config=None, **layout):
  config = config or demo.get_config()
  for path, value in overrides:
    set_field(config, path, value)
  try:
    cv.validate(config, **layout)
  except cv.ConfigError as e:
    return e.problems
  return []


def one_class_folder(root):
  os.makedirs(os.path.join(root, 'only'))
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(os.path.join(root, 'only', f'{i}.png'))
  return str(root)


# -------------------------------------------------------------------------------- validate()

BAD = [  # (field, bad value, part of the requirement)
    ('model.name', 'F9', 'not a registered model'),
    ('model.num_classes', 0, '>= 1'),
    ('model.drop_rate', 1.0, '[0, 1)'),
    ('model.stochdepth_rate', -0.1, '[0, 1)'),
    ('model.width', 0.0, '> 0'),
    ('model.depths', (1, 1), '4 integers'),
    ('model.conv_impl', 'fast', "'xla'"),
    ('dtype', 'float64', "'bfloat16'"),
    ('batch_size', 0, '>= 1'),
    ('grad_accum_steps', 0, '>= 1'),
    ('training_steps', 0, '>= 1'),
    ('training_steps', -5, '>= 1'),
    ('epochs', 0.0, '> 0'),
    ('seed', -1, '>= 0'),
    ('label_smoothing', 1.0, '[0, 1)'),
    ('ema_decay', 1.5, '[0, 1]'),
    ('log_every', 0, '>= 1'),
    ('eval_every', -1, '>= 0'),
    ('checkpoint_every', 0, '>= 1'),
    ('keep_checkpoints', 0, '>= 1'),
    ('eval_batch_size', 0, '>= 1'),
    ('optimizer.base_lr', -1.0, '> 0'),
    ('optimizer.base_lr', 0.0, '> 0'),
    ('optimizer.momentum', 1.0, '[0, 1)'),
    ('optimizer.weight_decay', -1e-5, '>= 0'),
    ('optimizer.warmup_epochs', -1.0, '>= 0'),
    ('optimizer.min_lr', -0.1, '>= 0'),
    ('optimizer.agc.clipping', -0.01, '> 0'),
    ('optimizer.agc.eps', 0.0, '> 0'),
    ('optimizer.name', 'rmsprop', "'sgd', 'adamw', 'lamb'"),
    ('optimizer.sam_rho', -0.05, '>= 0'),
    ('optimizer.sam_batch_fraction', 0.0, '(0, 1]'),
    ('optimizer.sam_batch_fraction', 1.5, '(0, 1]'),
    ('dataset.name', 'imagenet20122', 'not a known dataset'),
    ('dataset.train_split', 'validation', "'train', 'test'"),
    ('dataset.image_size', 0, '>= 1'),
    ('dataset.eval_resize_pad', -1, '>= 0'),
    ('dataset.folder_eval_fraction', 1.0, '[0, 1)'),
    ('dataset.num_workers', -1, '>= 0'),
    ('dataset.num_threads', 0, '>= 1'),
    ('dataset.augment.crop_area_min', 0.0, '(0, 1]'),
    ('dataset.augment.mixup_alpha', -0.2, '>= 0'),
    ('dataset.augment.ra_layers', -1, '>= 0'),
    ('dataset.augment.ra_magnitude', 31, '[0, 30]'),
    ('dataset.augment.ra_ops', 'tf', "'reference', 'pil'"),
    ('init_from', '/nonexistent/F0_haiku.npz', 'does not exist'),
]


@pytest.mark.parametrize('field,value,requirement', BAD, ids=[f'{f}={v}' for f, v, _ in BAD])
def test_each_bad_value_is_one_line_naming_field_and_value(field, value, requirement):
  found = problems([(field, value)])
  assert len(found) == 1, found
  assert found[0].startswith(f'{field}={value!r} ') and requirement in found[0], found[0]
  assert '\n' not in found[0]


def test_sam_fraction_that_leaves_no_example_on_a_device():
  config = _with(demo.get_config(), [('optimizer.sam_rho', 0.05), ('optimizer.sam_batch_fraction', 0.01),
                                     ('batch_size', 64)])
  with pytest.raises(cv.ConfigError, match=r'sam_batch_fraction=0.01 leaves no example .* device of 16 '
                                           r'images .* at least 0.0625'):
    cv.validate(config, process_count=1, local_devices=4)
  config.optimizer.sam_batch_fraction = 0.0625   # one example of 16
  cv.validate(config, process_count=1, local_devices=4)


def test_all_problems_are_reported_together():
  bad = [('optimizer.base_lr', -1.0), ('ema_decay', 1.5), ('model.name', 'F9'), ('eval_every', -1)]
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(_with(demo.get_config(), bad))
  assert [line.split('=')[0] for line in e.value.problems] == [
      'ema_decay', 'eval_every', 'optimizer.base_lr', 'model.name']
  assert str(e.value).splitlines() == e.value.problems and isinstance(e.value, ValueError)


def test_bad_tuning_switch_is_refused_before_compiling(monkeypatch):
  monkeypatch.setenv('NFNETS_TUNING', 'fast')
  with pytest.raises(cv.ConfigError) as e:
    cv.validate(demo.get_config())
  assert e.value.problems == ["environment variable NFNETS_TUNING='fast'; accepted: on, off"]
  monkeypatch.setenv('NFNETS_TUNING', 'on')
  cv.validate(demo.get_config())


def _with(config, overrides):
  for path, value in overrides:
    set_field(config, path, value)
  return config


def test_agc_values_are_free_when_agc_is_off():
  assert problems([('optimizer.agc.enabled', False), ('optimizer.agc.clipping', -1.0)]) == []


def test_shipped_configs_pass():
  from configs import agc_study, finetune  # pylint: disable=g-import-not-at-top
  for config in (demo.get_config(), agc_study.get_config(), finetune.get_config('digits')):
    assert cv.validate(config).num_classes == 10
  fake = _with(f0.get_config(), [('dataset.name', 'fake')])
  assert cv.validate(fake, process_count=1, local_devices=4).num_train_examples == IMAGENET_TRAIN_EXAMPLES


def test_training_length_needs_epochs_or_steps():
  found = problems([('training_steps', None), ('epochs', None)])
  assert found == ['epochs=None with training_steps=None: set one of them (epochs decides when '
                   'training_steps is None)']
  # 1 epoch of 1437 digits at batch 2048 is 0 steps.
  found = problems([('training_steps', None), ('epochs', 1.0), ('batch_size', 2048)])
  assert len(found) == 1 and found[0].startswith('epochs=1.0 of 1437 examples at batch_size=2048 is 0 steps')


def test_folder_data_dir_must_exist_and_hold_class_folders(tmp_path):
  found = problems([('dataset.name', 'folder'), ('dataset.data_dir', str(tmp_path / 'nope'))])
  assert len(found) == 1 and found[0].startswith(f"dataset.data_dir='{tmp_path}/nope' does not exist")
  found = problems([('dataset.name', 'folder'), ('dataset.data_dir', str(tmp_path))])
  assert len(found) == 1 and found[0].startswith(f"dataset.data_dir='{tmp_path}': No class subfolders")
  found = problems([('dataset.name', 'folder')])
  assert len(found) == 1
  assert found[0].startswith("dataset.data_dir=None must be set for dataset.name='folder'")


def test_tfds_data_dir_is_checked_and_community_names_accepted(tmp_path):
  found = problems([('dataset.name', 'cifar10'), ('dataset.data_dir', str(tmp_path / 'nope'))])
  assert len(found) == 1 and found[0].startswith(f"dataset.data_dir='{tmp_path}/nope' does not exist")
  assert problems([('dataset.name', 'huggingface:beans')]) == []   # not checkable offline


def test_class_count_mismatch_says_what_to_set(tmp_path):
  folder = one_class_folder(tmp_path / 'data')
  found = problems([('dataset.name', 'folder'), ('dataset.data_dir', folder), ('model.num_classes', 2)])
  assert found == [f"model.num_classes=2 but dataset 'folder' in '{folder}' has 1 class: set "
                   '--config.model.num_classes=1, or use data with 2 classes']
  weights = tmp_path / 'w.npz'
  weights.write_bytes(b'')
  found = problems([('model.num_classes', 1000), ('init_from', str(weights))])
  assert len(found) == 1 and 'fine-tuning from init_from: set --config.model.num_classes=10' in found[0]
  assert 'has 10 classes' in found[0] and 're-initialised' in found[0]


def test_init_from_folder_needs_a_checkpoint(tmp_path):
  found = problems([('init_from', str(tmp_path))])
  assert len(found) == 1 and found[0].startswith(f"init_from='{tmp_path}' holds no checkpoint")
  os.makedirs(tmp_path / 'checkpoints' / '300')
  assert problems([('init_from', str(tmp_path))]) == []


def test_batch_layout_is_checked_with_device_counts():
  found = problems([('eval_batch_size', 201)], process_count=1, local_devices=4)
  assert found == ['eval_batch_size=201 must be divisible by processes (1) x local devices (4) x '
                   'grad_accum_steps (1) = 4; try eval_batch_size=200']
  found = problems([('dataset.augment.cutmix', True), ('eval_batch_size', 256)], process_count=2,
                   local_devices=64)
  assert len(found) == 1 and 'MixUp/CutMix' in found[0] and found[0].startswith('batch_size=128 ')


def test_check_batch_layout_keeps_its_message():
  assert cv.check_batch_layout(4096, 2, 4, 8) == 64
  with pytest.raises(cv.ConfigError, match=r'^batch_size=100 must be divisible by processes \(2\) x local '
                     r'devices \(4\) x grad_accum_steps \(3\) = 24; try batch_size=96$'):
    cv.check_batch_layout(100, 3, 2, 4)


def test_resolve_training_steps_keeps_epochs_when_the_batch_changes():
  c = f0.get_config()
  assert c.training_steps is None and c.epochs == 360 and not hasattr(base, 'IMAGENET_TRAIN_EXAMPLES')
  assert cv.resolve_training_steps(c, IMAGENET_TRAIN_EXAMPLES) == 112_602          # batch 4096
  c.batch_size = 1024
  assert cv.resolve_training_steps(c, IMAGENET_TRAIN_EXAMPLES) == 450_410          # still 360 epochs
  c.training_steps = 1000                                                          # set: it decides
  assert cv.resolve_training_steps(c, IMAGENET_TRAIN_EXAMPLES) == 1000


# -------------------------------------------------------------------------------- console filter

def test_console_filter_drops_third_party_info_and_keeps_project_lines(tmp_path):
  from nfnets import console  # pylint: disable=g-import-not-at-top
  project = tmp_path / 'nfnets' / 'run_dir.py'
  vendor = tmp_path / '.venv' / 'lib' / 'python3.11' / 'site-packages' / 'orbax' / 'checkpoint_manager.py'
  for path, text in ((project, 'project'), (vendor, 'orbax')):
    os.makedirs(path.parent)
    path.write_text('from absl import logging\n\ndef log():\n'
                    f'  logging.info("{text} info")\n  logging.warning("{text} warning")\n'
                    f'  logging.error("{text} failed: No space left on device [os_error_code=\'28\']")\n'
                    f'  logging.error("{text} error")\n')
  seen = []
  handler = std_logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  handler.addFilter(console.ProjectLogFilter(root=str(tmp_path)))
  logger = absl_logging.get_absl_logger()
  logger.addHandler(handler)
  old_level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    for path in (project, vendor):   # absl records the calling file, as for orbax's lines
      namespace = {}
      exec(compile(path.read_text(), str(path), 'exec'), namespace)  # pylint: disable=exec-used
      namespace['log']()
  finally:
    logger.removeHandler(handler)
    absl_logging.set_verbosity(old_level)
  # A third party's report of a storage fault is left to the command's one `error:` line (console.run).
  assert seen == ['project info', 'project warning', "project failed: No space left on device "
                  "[os_error_code='28']", 'project error', 'orbax warning', 'orbax error']


IMPORT_TENSORFLOW = '''
import sys
if sys.argv[1] == 'after_the_console':
  from nfnets import console
  console.configure(0)
  assert 'tensorflow' not in sys.modules   # imported by what needs it, not by the console
import tensorflow
print(tensorflow.constant(2).numpy())
'''


def test_tensorflow_is_imported_only_when_needed_and_quietly(tmp_path):
  """Imported on its own, TensorFlow writes absl C++ notices that TF_CPP_MIN_LOG_LEVEL does not reach;
  imported by a command (after the console, so after JAX) it writes none. A command that fails on its
  flags never imports it (the seconds it takes are saved on every bad flag)."""
  env = {k: v for k, v in cli_helpers.ENV.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=cli_helpers.ROOT, env=env,
                                     capture_output=True, text=True, timeout=300)
  plain, ours = run('-c', IMPORT_TENSORFLOW, 'plain'), run('-c', IMPORT_TENSORFLOW, 'after_the_console')
  assert plain.stdout == ours.stdout == '2\n', (plain.stderr, ours.stderr)
  assert 'absl::InitializeLog' in plain.stderr, plain.stderr   # the control
  assert ours.stderr == ''
  bad_flag = run('-X', 'importtime', 'train.py', '--config=configs/demo.py', f'--workdir={tmp_path}',
                 '--config.batch_size=0')
  assert bad_flag.returncode == 2 and 'batch_size=0' in bad_flag.stderr
  imported = [line.rsplit('|', 1)[-1].strip() for line in bad_flag.stderr.splitlines() if '|' in line]
  assert 'jax' in imported and 'tensorflow' not in imported


# -------------------------------------------------------------------------------- train.py subprocesses

CLI_CASES = {  # name: (extra args, the field the error line must name)
    'typo': (['--config.model.nmae=F0'], "'model.nmae'"),
    'base_lr': (['--config.optimizer.base_lr=-1.0'], 'optimizer.base_lr=-1.0'),
    'variant': (['--config.model.name=F9'], "model.name='F9'"),
    'init_from': (['--config.init_from=/nonexistent/F0_haiku.npz'], "init_from='/nonexistent/F0_haiku.npz'"),
    'dataset': (['--config.dataset.name=imagenet20122'], "dataset.name='imagenet20122'"),
    'one_class_folder': (['--config.dataset.name=folder', '--config.dataset.data_dir={folder}',
                          '--config.model.num_classes=2'], 'model.num_classes=2'),
    'config_file': (['--config=configs/nope.py'], '--config=configs/nope.py'),
}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  """All cases at once, in parallel: each is a fresh interpreter importing JAX and TensorFlow."""
  folder = one_class_folder(tmp_path_factory.mktemp('folder'))
  env = cli_helpers.ENV
  procs = {}
  for name, (args, _) in CLI_CASES.items():
    workdir = str(tmp_path_factory.mktemp(name) / 'workdir')
    cmd = [sys.executable, 'train.py', '--config=configs/demo.py', f'--workdir={workdir}']
    cmd += [a.format(folder=folder) for a in args]
    procs[name] = (workdir, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
  results = {}
  for name, (workdir, proc) in procs.items():
    _, stderr = proc.communicate(timeout=300)
    results[name] = (workdir, proc.returncode, stderr)
  return results


@pytest.mark.parametrize('name', list(CLI_CASES))
def test_train_py_user_error_is_one_line_and_exit_2(cli_runs, name):
  workdir, returncode, stderr = cli_runs[name]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
  assert CLI_CASES[name][1] in lines[0]
  assert returncode == 2
  assert not os.path.exists(workdir)   # refused before anything is written
