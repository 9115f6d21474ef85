"""Signal-propagation plots: measured block statistics at init against the beta/alpha rule of the plan
the model is built from."""
import os

import numpy as np
import pytest

from research import spp

SMALL_NFNET = dict(depths=(1, 5, 1, 1), widths=(32, 64, 128, 128), group_width=16, stem_widths=(8, 16, 16))


@pytest.fixture(scope='module')
def nfnet_spp():
  x = spp.gaussian_images(8, 64)
  return spp.measure('nfnet_tiny', x, skip_gains=(None, 1.0), num_classes=10, **SMALL_NFNET)


def test_spp_default_init_blocks_are_identities(nfnet_spp):
  """Skip gains start at 0: every non-transition block passes its input through unchanged."""
  m = nfnet_spp['default init (skip gain 0)']
  plain = ~spp.transitions(spp.block_plan('nfnet_tiny', **SMALL_NFNET))
  var = m['avg_var']
  np.testing.assert_allclose(var[1:][plain[1:]], var[:-1][plain[1:]], rtol=1e-5)
  # Block 0 (stride 1, beta 1) keeps unit variance on both paths.
  np.testing.assert_allclose([var[0], m['res_avg_var'][0]], 1.0, rtol=0.2)


def test_spp_follows_beta_alpha_rule_and_stays_bounded(nfnet_spp):
  """With skip gains 1: each plain block adds alpha^2 x its residual variance, so within a stage the
  variance grows linearly, like the rule 1 + k alpha^2, not exponentially; the squared mean stays small."""
  blocks = spp.block_plan('nfnet_tiny', **SMALL_NFNET)
  alpha = 0.2
  assert [b.stage for b in blocks] == [0, 1, 1, 1, 1, 1, 2, 3] and {b.alpha for b in blocks} == {alpha}
  m = nfnet_spp['skip gain 1']
  var, res = m['avg_var'], m['res_avg_var']
  # Stage 2 = blocks 1..5; blocks 2..5 are plain.
  np.testing.assert_allclose(np.diff(var[1:6]), alpha ** 2 * res[2:6], rtol=0.3)
  rule = spp.expected_variance(blocks)
  np.testing.assert_allclose(rule, [1.04, 1.04, 1.08, 1.12, 1.16, 1.2, 1.04, 1.04])
  # Relative to the stage's transition block, the variance follows the rule's growth (within 15%)...
  np.testing.assert_allclose(var[1:6] / var[1], rule[1:6] / rule[1], rtol=0.15)
  # ... and stays bounded: no block exceeds its stage start by more than the rule's 1 + 4 alpha^2 (+15%).
  assert (var[1:6] / var[1]).max() < (1 + 4 * alpha ** 2) * 1.15
  assert var.max() < 1.2 and m['avg_sq_mean'].max() < 0.05


def test_spp_nf_resnet_matches_rule_in_absolute_terms():
  """NF-ResNet shortcuts are strided convs (no average pooling), so on Gaussian input even the absolute
  variance follows the rule: 1 + alpha^2 after each transition, + alpha^2 per plain block."""
  kw = dict(width=1, depths=(1, 3, 1, 1))
  results = spp.measure('nf_resnet26', spp.gaussian_images(8, 64), skip_gains=(1.0,), num_classes=10, **kw)
  var = results['skip gain 1']['avg_var']
  np.testing.assert_allclose(var, spp.expected_variance(spp.block_plan('nf_resnet26', **kw)), rtol=0.12)


def test_spp_plot_draws_the_measurements_and_the_rule(tmp_path, nfnet_spp):
  out = str(tmp_path / 'spp.png')
  blocks = spp.block_plan('nfnet_tiny', **SMALL_NFNET)
  drawn = spp.plot(out, nfnet_spp, blocks, title='test')
  assert os.path.getsize(out) > 10_000
  assert set(drawn) == set(spp.METRICS)
  for metric, lines in drawn.items():
    for label, measured in nfnet_spp.items():
      np.testing.assert_array_equal(lines[label], measured[metric])
  np.testing.assert_allclose(drawn['avg_var']['β/α rule (gains 1)'], spp.expected_variance(blocks))
  assert 'β/α rule (gains 1)' not in drawn['avg_sq_mean']


def test_spp_bad_input():
  with pytest.raises(ValueError, match='Unknown SPP input'):
    spp.make_images('noise', 2, 8)
  with pytest.raises(ValueError):
    spp.measure('F9', spp.gaussian_images(1, 8))
