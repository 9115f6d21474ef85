"""timm -> Haiku weight conversion checked by logits, against a committed timm fixture (no torch needed).

`tests/fixtures/timm_nfnet_tiny.npz` holds a reduced timm `dm_nfnet_f0`-family model's state dict with
random weights, gains, biases and skipinit gains, an input and timm's eval-mode logits; it is written by
`tools/make_timm_fixture.py` (run with a separate torch + timm virtualenv; see that file). The fixture
sets timm's conv eps to 1e-10 and uses tanh-approximate GELU, as DeepMind's code does, so the only
difference left is float32 rounding.
"""
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets
from nfnets import weights

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'timm_nfnet_tiny.npz')
# Measured max |diff| 2.4e-6 (float32 rounding) with |logits| up to 3.2. The mismatches this must catch are
# far larger: timm eps=1e-5 on the variance gives 1.5e-4, exact GELU 1.4e-3, a wrong mapping O(1).
ATOL, RTOL = 1e-5, 0.0


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  sd = {k[len('sd/'):]: v for k, v in data.items() if k.startswith('sd/')}
  return sd, data


def make_model(data):
  depths = tuple(int(d) for d in data['depths'])
  widths = tuple(int(c) for c in data['channels'])
  stem_chs = int(data['stem_chs'])
  assert stem_chs == widths[0] // 2, 'the project derives the last stem conv width as widths[0] // 2'
  # timm's deep_quad stem is (stem_chs // 8, // 4, // 2, stem_chs); the last comes from widths.
  stem_widths = (stem_chs // 8, stem_chs // 4, stem_chs // 2)
  num_classes = int(data['num_classes'])

  def forward(x):
    model = nfnets.NFNet(num_classes, variant='F0', depths=depths, widths=widths,
                         group_width=int(data['group_size']), stem_widths=stem_widths)
    return model(x, is_training=False)

  return hk.without_apply_rng(hk.transform(forward))


def test_fixture_config(fixture):
  _, data = fixture
  assert str(data['act_layer']) == 'gelu_tanh'  # DeepMind's GELU; exact GELU differs by 1.4e-3 here
  assert float(data['std_conv_eps']) <= 1e-8  # below every fan_in * var, like DeepMind's 1e-4 floor
  assert data['input_nchw'].shape[:2] == (2, 3) and data['logits'].shape == (2, int(data['num_classes']))
  assert os.path.getsize(FIXTURE) < 1 << 20


def test_converted_tree_matches_model(fixture):
  sd, data = fixture
  params = weights.from_timm(sd)
  depths = [int(d) for d in data['depths']]
  blocks = sum(depths)
  # Per block: 4 convs (w, gain, bias), SE 2 x (w, b), skip_gain; + shortcut conv in each stage's
  # first block. Plus 4 stem convs, the final conv and the classifier (w, b).
  expected = blocks * (4 * 3 + 2 * 2 + 1) + len(depths) * 3 + 4 * 3 + 3 + 2
  assert len(sd) == expected == 114
  assert len(jax.tree.leaves(params)) == expected
  x = jnp.zeros((1,) + data['input_nchw'].shape[2:] + (3,))
  shapes = jax.eval_shape(make_model(data).init, jax.random.PRNGKey(0), x)
  assert sorted(params) == sorted(shapes)
  for module, ps in shapes.items():
    assert sorted(params[module]) == sorted(ps), module
    for name, s in ps.items():
      assert params[module][name].shape == s.shape, (module, name)
  # And back: to_timm inverts from_timm exactly, names and layouts included.
  back = weights.to_timm(params)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].reshape(v.shape), v, err_msg=k)
    assert back[k].shape == v.shape, k


def test_timm_logits_match(fixture):
  sd, data = fixture
  params = weights.from_timm(sd)
  x = data['input_nchw'].transpose(0, 2, 3, 1)  # timm's NCHW -> the project's NHWC
  got = np.asarray(jax.jit(make_model(data).apply)(params, x))
  want = data['logits']
  assert np.abs(want).max() > 0.5 and np.std(want) > 0.1  # not a degenerate output
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
