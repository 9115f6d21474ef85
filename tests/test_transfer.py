"""tools.linear_probe and tools.export: the ridge probe against scikit-learn, few-shot sampling, the exported
function against tools.predict (read back by a JAX-only process), and bad inputs."""
import os
import re
import subprocess
import sys
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from nfnets import registry
from tools import export as export_tool
from tools import linear_probe as lp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses: one CPU device (a 6-step train run compiles in half the time of 4 simulated devices) and
# the tests' persistent compilation cache (conftest.py), so a rerun skips most compiling.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS='',
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.pytest_cache', 'jax_cache'),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')


def run_tool(*args, cwd=ROOT, python=(sys.executable,)):
  return subprocess.run([*python, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def assert_user_error(proc, *words):
  """Exit code 2, no traceback, and one `error: ...` line naming every word."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-2000:]
  for w in words:
    assert w in errors[0], errors[0]
  return errors[0]


# ---------------------------------------------------------------------------------------------------- probe

@pytest.fixture(scope='module')
def digits():
  return demo.get_config().dataset


@pytest.fixture(scope='module')
def features(digits):
  """pre_logits of a randomly initialised nfnet_tiny for digits train and test."""
  return extract_all(random_params(), digits)


def random_params(seed=0):
  """nfnet_tiny params as Haiku's init shapes them, drawn with NumPy (compiling the init takes ~15 s on
  CPU): N(0, 1) weights (WSConv2D standardises them), unit gains, zero biases, skip gains 0 (SkipInit)."""
  net = hk.transform(lambda x: registry.create_model('nfnet_tiny', 10)(x, is_training=False))
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.RandomState(seed)
  fill = {'w': lambda s: rng.standard_normal(s), 'gain': np.ones, 'skip_gain': np.zeros, 'b': np.zeros,
          'bias': np.zeros}
  return {m: {k: fill[k](v.shape).astype(np.float32) for k, v in ps.items()} for m, ps in shapes.items()}


def extract_all(params, digits):
  fn = lp.feature_fn('nfnet_tiny', 10)
  kw = dict(image_size=32, batch_size=256, fn=fn, log=None)
  train = lp.extract_features(params, 'nfnet_tiny', 10, digits, 'train', **kw)
  test = lp.extract_features(params, 'nfnet_tiny', 10, digits, 'eval', **kw)
  return train + test


def test_features_cover_both_splits(features):
  train_x, train_y, test_x, test_y = features
  assert train_x.shape == (1437, 256) and test_x.shape == (360, 256)
  assert train_x.dtype == np.float32 and np.isfinite(train_x).all()
  assert np.bincount(train_y, minlength=10).min() > 100 and set(test_y) == set(range(10))


def test_probe_beats_chance_and_matches_sklearn(features):
  from sklearn.linear_model import Ridge  # pylint: disable=g-import-not-at-top
  train_x, train_y, test_x, test_y = features
  res = lp.linear_probe(train_x, train_y, test_x, test_y, 10)
  assert res['top1'] > 0.5, res['top1']   # chance is 0.1
  assert res['c'] in lp.REG_GRID and set(res['holdout_top1']) == set(lp.REG_GRID)
  # An independent closed-form solver with the chosen alpha: same weights, intercept and predictions.
  ref = Ridge(alpha=res['alpha'], fit_intercept=True, solver='cholesky').fit(
      train_x.astype(np.float64), np.eye(10)[train_y])
  scale = np.abs(ref.coef_).max()
  np.testing.assert_allclose(res['w'], ref.coef_.T, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(res['b'], ref.intercept_, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_array_equal(lp.predict(res['w'], res['b'], test_x),
                                np.argmax(ref.predict(test_x.astype(np.float64)), axis=1))
  assert res['top1'] == pytest.approx(np.mean(lp.predict(res['w'], res['b'], test_x) == test_y))


def test_ridge_path_and_dual_solve_match_sklearn(features):
  from sklearn.linear_model import Ridge  # pylint: disable=g-import-not-at-top
  train_x, train_y = features[0][:300], features[1][:300]
  alphas = [lp.relative_alpha(train_x, c) for c in (1e-4, 1e-2, 1.0)]
  for alpha, (w, b) in zip(alphas, lp.ridge_path(train_x, train_y, 10, alphas)):
    ref = Ridge(alpha=alpha).fit(train_x.astype(np.float64), np.eye(10)[train_y])
    np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-5, atol=1e-7 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-5, atol=1e-7 * np.abs(ref.coef_).max())
  few = np.arange(50)   # fewer examples (50) than features (256): the dual system
  w, b = lp.ridge_fit(train_x[few], train_y[few], 10, alphas[1])
  ref = Ridge(alpha=alphas[1]).fit(train_x[few].astype(np.float64), np.eye(10)[train_y[few]])
  np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-5, atol=1e-7 * np.abs(ref.coef_).max())


def test_holdout_is_stratified_and_disjoint():
  labels = np.repeat(np.arange(4), [10, 20, 5, 1])
  fit, held = lp.stratified_holdout(labels, 0.2, seed=0)
  assert not set(fit) & set(held) and sorted(np.concatenate([fit, held])) == list(range(len(labels)))
  assert list(np.bincount(labels[held], minlength=4)) == [2, 4, 1, 0]


def test_few_shot_samples_exactly_k_per_class(features):
  train_y = features[1]
  for k in (1, 5):
    draws = [lp.few_shot_indices(train_y, k, seed, 10) for seed in range(3)]
    for idx in draws:
      assert len(set(idx)) == len(idx) == 10 * k
      assert list(np.bincount(train_y[idx], minlength=10)) == [k] * 10
    np.testing.assert_array_equal(draws[0], lp.few_shot_indices(train_y, k, 0, 10))  # seeded
    assert not np.array_equal(draws[0], draws[1])
  res = lp.few_shot(*features, 10, shots=[1, 5], seeds=2, c=1e-2)
  assert sorted(res) == [1, 5] and all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in res.values())


def test_too_many_shots_names_the_value_and_the_limit(features):
  train_x, train_y, test_x, test_y = features
  limit = int(np.bincount(train_y).min())
  with pytest.raises(lp.ProbeError, match=rf'--shots={limit + 1} .* k <= {limit}'):
    lp.linear_probe(train_x, train_y, test_x, test_y, 10, shots=[1, limit + 1])
  with pytest.raises(lp.ProbeError, match=r'--shots=0'):
    lp.parse_shots(['5', '0'])


def test_empty_split_is_an_error(tmp_path, digits):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c in ('a', 'b'):
    os.makedirs(tmp_path / 'train' / c)
    os.makedirs(tmp_path / 'val' / c)
    Image.new('RGB', (8, 8), (10, 200, 30)).save(tmp_path / 'train' / c / 'x.png')
  ds = digits.copy_and_resolve_references()
  ds.name, ds.data_dir, ds.eval_split = 'folder', str(tmp_path), 'val'
  with pytest.raises(lp.ProbeError, match=r"eval split \(folder 'val'\) is empty"):
    lp.open_split(ds, 'eval')
  x = np.zeros((0, 4), np.float32)
  with pytest.raises(lp.ProbeError, match='train split is empty'):
    lp.linear_probe(x, np.zeros(0, np.int64), x, np.zeros(0, np.int64), 2)


def test_probe_command_user_errors():
  assert_user_error(run_tool('-m', 'tools.linear_probe', '--config=configs/demo.py', '--init_from=runs/x',
                             '--shots=5,0'), '--shots=0', '>= 1')
  assert_user_error(run_tool('-m', 'tools.linear_probe', '--config=configs/demo.py',
                             '--init_from=/nonexistent/run'), '/nonexistent/run')


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A short demo run (its EMA params after a few steps)."""
  w = str(tmp_path_factory.mktemp('run'))
  proc = run_tool('train.py', '--config=configs/demo.py', f'--workdir={w}', '--config.training_steps=6',
                  '--config.batch_size=16', '--config.eval_every=0', '--config.checkpoint_every=6',
                  '--config.log_every=6', '--config.model.conv_impl=xla')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return w


def test_probe_command_on_a_trained_workdir(workdir):
  proc = run_tool('-m', 'tools.linear_probe', '--config=configs/demo.py', f'--init_from={workdir}',
                  '--shots=2', '--seeds=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  m = re.fullmatch(r'linear probe top1 (\d\.\d{4})', lines[-1])
  assert m and 0.3 < float(m.group(1)) <= 1, proc.stdout   # beats chance (0.1) clearly
  assert any(line.startswith('2-shot top1 ') for line in lines), proc.stdout
  assert re.search(r"features digits 'train': 1437/1437 images, [\d.]+ images/s", proc.stderr)


def digit_crops(n):
  """Eval-preprocessed (resized, cropped, not normalised) float32 digits test images in 0..255."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nfnets.data import preprocess, sources  # pylint: disable=g-import-not-at-top
  images = sources.digits_arrays()['test'][0][:n]
  return np.stack([preprocess.eval_image(tf.constant(im), encoded=False, image_size=32, resize_pad=0).numpy()
                   for im in images]).astype(np.float32)


READER = textwrap.dedent('''
    import sys
    import numpy as np
    import jax
    repo, path, images, out = sys.argv[1:]
    try:
      import nfnets  # noqa
      raise SystemExit('nfnets is importable: the reader must not see the repository')
    except ImportError:
      pass
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    np.save(out, np.asarray(exported.call(np.load(images))))
    print(sorted({m.split('.')[0] for m in sys.modules} & {'nfnets', 'tools', 'haiku', 'tensorflow', 'configs'}))
''')


@pytest.fixture(scope='module')
def exported(workdir, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp('export')
  out, sm = str(out_dir / 'demo.jaxexport'), str(out_dir / 'sm')
  proc = run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}', f'--savedmodel={sm}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, sm


def test_export_reloads_without_the_repo_and_matches_predict(exported, workdir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from nfnets.data import normalize  # pylint: disable=g-import-not-at-top
  from tools import predict  # pylint: disable=g-import-not-at-top
  out, _ = exported
  with open(out + '.json') as f:
    meta = json.load(f)
  assert meta['model'] == 'nfnet_tiny' and meta['num_classes'] == 10 and meta['image_size'] == 32
  assert meta['resize_pad'] == 0 and meta['class_names'] == [str(i) for i in range(10)]
  assert meta['normalization']['mean_rgb'] == list(normalize.MEAN_RGB)
  assert meta['normalization']['stddev_rgb'] == list(normalize.STDDEV_RGB)
  crops = digit_crops(7)   # an odd batch: the batch dimension is symbolic
  np.save(tmp_path / 'images.npy', crops)
  (tmp_path / 'reader.py').write_text(READER)
  # -I: isolated mode (no PYTHONPATH, no script or working folder on sys.path); cwd is outside the repo.
  proc = run_tool('reader.py', ROOT, out, str(tmp_path / 'images.npy'), str(tmp_path / 'logits.npy'),
                  cwd=str(tmp_path), python=(sys.executable, '-I'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == '[]', proc.stdout   # only JAX was imported
  got = np.load(tmp_path / 'logits.npy')
  want = predict.Predictor(workdir).logits(crops)   # both normalise inside
  assert got.shape == want.shape == (7, 10)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_savedmodel_matches_predict(exported, workdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tools import predict  # pylint: disable=g-import-not-at-top
  _, sm = exported
  crops = digit_crops(5)
  got = tf.saved_model.load(sm).signatures['serving_default'](images=tf.constant(crops))['logits'].numpy()
  want = predict.Predictor(workdir).logits(crops)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_export_refuses_to_overwrite(exported, workdir):
  out, sm = exported
  before = open(out, 'rb').read()
  assert_user_error(run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}'),
                    out, 'exists', '--overwrite')
  assert_user_error(run_tool('-m', 'tools.export', f'--workdir={workdir}', f'--out={out}.new',
                             f'--savedmodel={sm}', '--overwrite'), sm, 'exists')
  assert open(out, 'rb').read() == before and not os.path.exists(out + '.new')


def test_export_refuses_weights_that_do_not_fit(workdir, tmp_path):
  out = str(tmp_path / 'x.jaxexport')
  assert_user_error(run_tool('-m', 'tools.export', f'--init_from={workdir}', '--num_classes=5', f'--out={out}'),
                    'do not match', 'num_classes=5')
  with pytest.raises(export_tool.ExportError, match='--image_size=64 does not fit .* 32 px'):
    export_tool.run(workdir, out, image_size=64)
  assert not os.listdir(tmp_path)
