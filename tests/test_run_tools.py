"""Every tool on a run directory. Two short runs trained with architecture overrides (an NF-ResNet with a
width and depths, an NFNet with depths) are evaluated at several sizes, predicted, exported and probed with
nothing but the run's folder: each tool builds the model the run's config.json describes
(`registry.model_from_config`). The exported function's logits equal predict's, the multi-size eval leaves
the run's own eval series as it was, and each tool's console holds only the project's lines."""
import glob
import json
import os
import re
import sysconfig
import textwrap

import jax
import numpy as np
import pytest

from cli_helpers import ROOT, TRAIN, console_lines, error_line, run_tool
from tools import export as export_tool

RUNS = {  # the overrides of each run (its name: what it overrides)
    'width': ['--config.model.name=nf_resnet26', '--config.model.width=0.25', '--config.model.depths=(1,1,1,1)'],
    'depths': ['--config.model.depths=(1,2,1,1)'],
}
MODELS = {'width': 'nf_resnet26', 'depths': 'nfnet_tiny'}


@pytest.fixture(scope='module', params=list(RUNS))
def run(request, tmp_path_factory):
  """(name, workdir) of a 4-step demo run with the overrides of RUNS[name]; it evaluates at the end."""
  workdir = str(tmp_path_factory.mktemp(request.param) / 'run')
  proc = run_tool('train.py', '--config=configs/demo.py', f'--workdir={workdir}', *TRAIN, *RUNS[request.param])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return request.param, workdir


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def tensorboard_points(workdir):
  """{tag: [steps]} of every scalar in the run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  points = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for raw in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      for value in event.summary.value:
        points.setdefault(value.tag, []).append(event.step)
  return points


def digit_images(directory, n=3):
  """The first `n` digits test images as PNG files (8x8: tools.predict resizes them as the eval does)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from nfnets.data import sources  # pylint: disable=g-import-not-at-top
  images, labels = sources.digits_arrays()['test']
  paths = []
  for i in range(n):
    paths.append(os.path.join(directory, f'digit_{i}_{labels[i]}.png'))
    Image.fromarray(images[i]).save(paths[-1])
  return paths


def eval_crops(paths, size=32):
  """The files as tools.predict feeds them to the model (`predict.load_images`; not normalised)."""
  from tools import predict  # pylint: disable=g-import-not-at-top
  return predict.load_images(paths, size, 0)[0]


def test_eval_needs_only_the_workdir_and_keeps_the_training_series(run):
  name, workdir = run
  before = records(workdir)
  (own,) = [r for r in before if r['kind'] == 'eval']
  proc = run_tool('train.py', f'--workdir={workdir}', '--mode=eval', '--eval_sizes=24,32')
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = records(workdir)
  assert after[:len(before)] == before   # nothing rewritten
  new = after[len(before):]
  assert [r['kind'] for r in new] == ['eval_24px', 'eval_32px'] and {r['step'] for r in new} == {4}
  # At the run's own size, the numbers of the eval the run logged: the same model, rebuilt from config.json.
  assert new[1]['ema_loss'] == pytest.approx(own['ema_loss'], rel=1e-5) and new[1]['top1'] == own['top1']
  assert new[0]['ema_loss'] != pytest.approx(own['ema_loss'], rel=1e-4)   # other pixels, other loss
  points = tensorboard_points(workdir)
  assert points['eval/top1'] == [4] and points['eval_24px/top1'] == [4] and points['eval_32px/top1'] == [4]
  ours, others = console_lines(proc.stderr)
  assert not others, others
  assert f'Config {workdir}/config.json' in ours[0] and sum('eval_' in line for line in ours) == 2
  assert len([line for line in proc.stdout.splitlines() if line.startswith('| ')]) == 3   # header, 2 sizes


@pytest.fixture(scope='module')
def predicted(run, tmp_path_factory):
  """tools.predict on three digit images, and tools.export (with a SavedModel) of the same run."""
  name, workdir = run
  folder = tmp_path_factory.mktemp(f'{name}_files')
  paths = digit_images(str(folder))
  proc = run_tool('-m', 'tools.predict', f'--weights={workdir}', '--json', '--top=10', *paths)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out, sm = str(folder / 'model.jaxexport'), str(folder / 'sm')
  exported = run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}', f'--savedmodel={sm}')
  assert exported.returncode == 0, exported.stderr[-3000:]
  return paths, proc, json.loads(proc.stdout), exported, out, sm


def test_predict_names_digits_and_prints_one_line(run, predicted):
  name, workdir = run
  paths, proc, results, _, _, _ = predicted
  assert [r['image'] for r in results] == paths
  for r in results:
    assert [t['label'] for t in r['top']] == [str(t['index']) for t in r['top']]   # digits: '0'..'9'
    assert sum(t['probability'] for t in r['top']) == pytest.approx(1, abs=1e-5)   # all 10 classes
  ours, others = console_lines(proc.stderr)
  assert not others and len(ours) == 2, proc.stderr
  assert ours[0].endswith(f'Read the EMA params of {workdir}/checkpoints at step 4')
  assert ours[1].endswith(f'{MODELS[name]} (10 classes) from {workdir}; images resized to 32 px, centre crop '
                          '32 px')


# The exported file read back by a process that cannot import this repository (python -I, another cwd).
# Run with `python -I -S`: the installed packages are put on the path without their .pth files, so the
# editable install of this repository (`make venv`) is not importable, as on a machine with only jax.
READER = textwrap.dedent('''
    import sys
    path, images, out, *site_packages = sys.argv[1:]
    sys.path.extend(site_packages)
    import numpy as np
    import jax
    try:
      import nfnets  # noqa
      raise SystemExit('nfnets is importable: the reader must not see the repository')
    except ImportError:
      pass
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    np.save(out, np.asarray(exported.call(np.load(images))))
''')


def test_exported_logits_equal_predicts(run, predicted, tmp_path):
  name, _ = run
  paths, _, results, exported, out, sm = predicted
  assert exported.stdout.startswith(f'wrote TF SavedModel {sm}\nwrote {out} (')
  ours, others = console_lines(exported.stderr)   # the weights read; the result lines on stdout
  assert not others and len(ours) == 1 and 'Read the EMA params of ' in ours[0], exported.stderr
  with open(out + '.json') as f:
    meta = json.load(f)
  assert meta['model'] == MODELS[name] and meta['num_classes'] == 10 and meta['image_size'] == 32
  assert meta['class_names'] == [str(i) for i in range(10)]
  assert meta['model_config']['depths'] == [int(d) for d in RUNS[name][-1].split('=(')[1][:-1].split(',')]
  np.save(tmp_path / 'images.npy', eval_crops(paths))
  (tmp_path / 'reader.py').write_text(READER)
  site_packages = sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})
  proc = run_tool('reader.py', out, str(tmp_path / 'images.npy'), str(tmp_path / 'logits.npy'),
                  *site_packages, cwd=str(tmp_path), python=(os.sys.executable, '-I', '-S'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  logits = np.load(tmp_path / 'logits.npy')
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for p, r in zip(probs, results):   # predict's ten (index, probability) pairs, most probable first
    np.testing.assert_allclose([p[t['index']] for t in r['top']], [t['probability'] for t in r['top']],
                               rtol=0, atol=1e-5)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  got = tf.saved_model.load(sm).signatures['serving_default'](
      images=tf.constant(eval_crops(paths)))['logits'].numpy()
  np.testing.assert_allclose(got, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize('run', ['depths'], indirect=True)  # the refusals do not depend on the architecture
def test_export_refuses_to_overwrite_or_a_bad_fit(run, predicted, tmp_path):
  _, workdir = run
  _, _, _, _, out, sm = predicted
  before = open(out, 'rb').read()
  line = error_line(run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}'), 2)
  assert out in line and 'exists' in line and '--overwrite' in line
  line = error_line(run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}.new',
                             f'--savedmodel={sm}', '--overwrite'), 2)
  assert sm in line and 'exists' in line
  line = error_line(run_tool('-m', 'tools.export', f'--init_from={workdir}', '--num_classes=5',
                             f'--out={tmp_path}/x.jaxexport'), 2)
  assert 'do not match' in line and 'num_classes=5' in line
  with pytest.raises(export_tool.ExportError, match='--image_size=64 does not fit .* 32 px'):
    export_tool.run(workdir, str(tmp_path / 'y.jaxexport'), image_size=64)
  assert open(out, 'rb').read() == before and not os.path.exists(out + '.new')
  assert not os.listdir(tmp_path)


def test_linear_probe_needs_only_the_workdir(run):
  name, workdir = run
  proc = run_tool('-m', 'tools.linear_probe', f'--workdir={workdir}', '--shots=2', '--seeds=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  m = re.fullmatch(r'linear probe top1 (\d\.\d{4})', lines[-1])
  assert m and 0.2 < float(m.group(1)) <= 1, proc.stdout   # chance is 0.1; 4 training steps
  assert len(lines) == 3 and lines[1].startswith('2-shot top1 ')
  ours, others = console_lines(proc.stderr)
  assert not others, others
  assert ours[0].endswith(f'Read the EMA params of {workdir}/checkpoints at step 4')
  assert f'{MODELS[name]} from {workdir}: pre_logits at 32 px' in ours[1]
  assert any("features digits 'train': 1437/1437 images" in line for line in ours)
  assert any("features digits 'test': 360/360 images" in line for line in ours)
  assert ours[-1].split('] ')[1].startswith('features: train (1437, ')
