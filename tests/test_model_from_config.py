"""`registry.model_from_config`: the one mapping from a config's `model` block to the model, used by the
experiment, the tools and the benchmark; NF-ResNets honour conv_impl as NFNets do."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiment
from configs import demo
from nfnets import registry
from nfnets import weights

WIDE = {'name': 'nfnet_tiny', 'num_classes': 7, 'width': 1.5, 'depths': [1, 2, 1, 1]}  # as in config.json


def shapes(fn, size=32):
  f = hk.transform(lambda x: fn()(x, is_training=False))
  tree = jax.eval_shape(f.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {f'{m}/{n}': tuple(v.shape) for m, ps in tree.items() for n, v in ps.items()}


def test_model_block_fields_reach_the_constructor():
  got = shapes(lambda: registry.model_from_config(WIDE))
  want = shapes(lambda: registry.create_model('nfnet_tiny', 7, width=1.5, depths=(1, 2, 1, 1)))
  default = shapes(lambda: registry.create_model('nfnet_tiny', 7))
  assert got == want and got != default
  # width 1.5 widens every stage (32, 64, 128, 128 -> 48, 96, 192, 192); a second block in stage 2.
  assert got['NFNet/~/nf_block/~/conv2/w'] == (1, 1, 16, 48)   # bottleneck: one group of 16
  assert sum(k.endswith('/skip_gain') for k in got) == 5
  assert got['NFNet/~/linear/w'] == (384, 7)   # final conv: 2 x the last stage's 192 channels
  name, num_classes, kwargs = registry.model_kwargs(dict(WIDE, drop_rate=None, conv_impl='xla'), remat=True)
  assert (name, num_classes) == ('nfnet_tiny', 7)
  assert kwargs == {'width': 1.5, 'depths': (1, 2, 1, 1), 'conv_impl': 'xla', 'remat': True}


def test_experiment_builds_the_config_model():
  config = demo.get_config()
  config.model.width, config.model.depths = 1.5, (1, 2, 1, 1)
  xp = experiment.Experiment(config, devices=jax.local_devices()[:1])
  params = {f'{m}/{n}': tuple(v.shape) for m, ps in xp.state_shapes().params.items() for n, v in ps.items()}
  block = dict(WIDE, num_classes=10)
  assert params == {f'{m}/{n}': s for m, ps in weights.config_shapes(block).items() for n, s in ps.items()}


def test_flops_follow_the_config():
  default = registry.plan_from_config({'name': 'nf_resnet26', 'num_classes': 10}).macs(64)
  narrow = registry.plan_from_config({'name': 'nf_resnet26', 'num_classes': 10, 'width': 1,
                                      'depths': (1, 1, 1, 1)}).macs(64)
  assert narrow == registry.count_flops('nf_resnet26', 64, 10, width=1, depths=(1, 1, 1, 1))
  assert narrow < default / 10   # width 1 of 4: ~1/16 of the MACs, and half the blocks


def test_weights_are_checked_against_the_config_model():
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(
      hk.transform(lambda x: registry.model_from_config(WIDE)(x, is_training=False)).init,
      jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
  weights.validate_config(params, WIDE)
  with pytest.raises(weights.WeightsError, match=r"(?s)config's model 'nfnet_tiny' \(num_classes=7, width=1.0, "
                                                 r'depths=\(1, 2, 1, 1\)\).*wrong shape'):
    weights.validate_config(params, dict(WIDE, width=1.0))
  with pytest.raises(weights.WeightsError):
    weights.validate(params, 'nfnet_tiny', 7)   # the registry's default nfnet_tiny is another shape


def _convolutions(conv_impl):
  f = hk.transform(lambda x: registry.model_from_config(
      {'name': 'nf_resnet26', 'num_classes': 10, 'width': 0.25, 'depths': (1, 1, 1, 1),
       'conv_impl': conv_impl})(x, is_training=False))
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(lambda p: f.apply(p, None, x))(params)
  return str(jaxpr).count('conv_general_dilated')


def test_nf_resnet_honours_conv_impl():
  """'matmul' lowers every 1x1 conv as a matmul (nfnets.conv): the NF-ResNet's 1x1 convs (conv0 and conv2
  of each block, each stage's shortcut) leave XLA's convolution; its 7x7 stem and 3x3 convs stay."""
  xla, matmul = _convolutions('xla'), _convolutions('matmul')
  assert xla == 1 + 4 * 3 + 4        # stem, 3 convs per block, a shortcut conv per stage
  assert matmul == 1 + 4             # stem and the four 3x3 convs
