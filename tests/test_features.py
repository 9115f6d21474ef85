"""`return_features`: intermediate outputs from the model API, with the parameter tree unchanged."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets

FEATURE_NAMES = ['stem', 'stage_1', 'stage_2', 'stage_3', 'stage_4', 'pre_logits']


def _transform(name, num_classes, **call_kw):
  return hk.transform(lambda x: nfnets.create_model(name, num_classes)(x, **call_kw))


def _feature_shapes(name, size, batch=2):
  f = _transform(name, 1000, is_training=False, return_features=True)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  logits, features = jax.eval_shape(f.apply, params, None, x)
  assert logits.shape == (batch, 1000)
  assert sorted(features) == sorted(FEATURE_NAMES)
  return {k: v.shape for k, v in features.items()}


def test_f0_feature_shapes_at_256():
  """F0 (paper Table 1 / reference widths 256, 512, 1536, 1536): stem /4 with 128 channels, stages at
  /4, /8, /16, /32, and pre_logits = final conv 2 x 1536 = 3072."""
  assert _feature_shapes('F0', 256) == {
      'stem': (2, 64, 64, 128),
      'stage_1': (2, 64, 64, 256),
      'stage_2': (2, 32, 32, 512),
      'stage_3': (2, 16, 16, 1536),
      'stage_4': (2, 8, 8, 1536),
      'pre_logits': (2, 3072),
  }


def test_nf_resnet50_feature_shapes_at_224():
  """NF-ResNet-50: 7x7/2 conv + 3x3/2 max pool (stem, 64 channels), ResNet-50's 256..2048 stages,
  pre_logits the 2048-wide pooled final stage (no final conv)."""
  assert _feature_shapes('nf_resnet50', 224) == {
      'stem': (2, 56, 56, 64),
      'stage_1': (2, 56, 56, 256),
      'stage_2': (2, 28, 28, 512),
      'stage_3': (2, 14, 14, 1024),
      'stage_4': (2, 7, 7, 2048),
      'pre_logits': (2, 2048),
  }


@pytest.mark.parametrize('name,fc', [('nfnet_tiny', 'NFNet/~/linear'), ('nf_resnet26', 'NF_ResNet/~/linear')])
def test_pre_logits_times_classifier_is_logits(name, fc):
  """pre_logits is exactly what the classifier reads: pre_logits @ w + b reproduces the logits."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  f = _transform(name, 10, is_training=False, return_features=True)
  params = jax.jit(f.init)(jax.random.PRNGKey(1), x)
  logits, features = jax.jit(f.apply)(params, None, x)
  w, b = params[fc]['w'], params[fc]['b']
  np.testing.assert_allclose(np.asarray(features['pre_logits'] @ w + b), np.asarray(logits),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['F0', 'nf_resnet50'])
def test_param_tree_unchanged_by_return_features(name):
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = lambda **kw: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      _transform(name, 1000, is_training=True, **kw).init, jax.random.PRNGKey(0), x))
  assert shapes(return_features=True) == shapes()


def test_features_with_metrics_and_in_training():
  """Both asked: (logits, metrics, features); in training the features are still returned (pre-dropout)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  f = hk.transform(lambda x: nfnets.create_model('nfnet_tiny', 10, drop_rate=0.5)(
      x, is_training=True, return_metrics=True, return_features=True))
  params = jax.jit(f.init)(jax.random.PRNGKey(1), x)
  logits, metrics, features = jax.jit(f.apply)(params, jax.random.PRNGKey(2), x)
  assert logits.shape == (2, 10) and sorted(features) == sorted(FEATURE_NAMES)
  assert set(metrics) == {'avg_sq_mean', 'avg_var', 'res_avg_var'}
  assert all(v.shape == (4,) for v in metrics.values())
  # The last stage's output is the last block's: its metric matches the stage_4 feature.
  np.testing.assert_allclose(float(metrics['avg_var'][-1]),
                             float(jnp.mean(jnp.var(features['stage_4'], axis=(0, 1, 2)))), rtol=1e-5)
