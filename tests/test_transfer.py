"""tools.linear_probe: the ridge probe against scikit-learn, few-shot sampling, and bad inputs. The commands
on trained runs (probe, export, predict) are in test_run_tools.py."""
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import error_line, run_tool
from configs import demo
from nfnets import registry
from tools import linear_probe as lp


def assert_user_error(proc, *words):
  """Exit code 2, no traceback, one `error: ...` line naming every word and no other console line."""
  line = error_line(proc, 2)
  for w in words:
    assert w in line, line
  return line


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
  model = {'name': 'nfnet_tiny', 'num_classes': 10}
  kw = dict(image_size=32, batch_size=256, fn=lp.feature_fn(model), log=False)
  train = lp.extract_features(params, model, digits, 'train', **kw)
  test = lp.extract_features(params, model, digits, 'eval', **kw)
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
    lp.check_split(ds, 'eval')
  x = np.zeros((0, 4), np.float32)
  with pytest.raises(lp.ProbeError, match='train split is empty'):
    lp.linear_probe(x, np.zeros(0, np.int64), x, np.zeros(0, np.int64), 2)


def test_probe_command_user_errors():
  assert_user_error(run_tool('-m', 'tools.linear_probe', '--config=configs/demo.py', '--init_from=runs/x',
                             '--shots=5,0'), '--shots=0', '>= 1')
  assert_user_error(run_tool('-m', 'tools.linear_probe', '--config=configs/demo.py',
                             '--init_from=/nonexistent/run'), '/nonexistent/run')
