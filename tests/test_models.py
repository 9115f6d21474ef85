"""Model structure against the paper's and reference code's numbers, and signal propagation at init."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets
from nfnets import layers

# (params at 1000 classes, MACs at test resolution, MACs at train resolution): the reference code's
# counts (its module tree; `NFNet.count_flops`), which the paper's model comparison rounds (F0: 71.5M,
# 12.38B FLOPs at 256 px).
NFNET_NUMBERS = {
    'F0': (71_489_284, 12.38e9, 6.98e9),
    'F1': (132_634_256, 35.54e9, 17.44e9),
    'F2': (193_779_228, 62.59e9, 33.14e9),
    'F3': (254_924_200, 114.76e9, 67.94e9),
    'F4': (316_069_172, 215.24e9, 121.12e9),
    'F5': (377_214_144, 289.76e9, 169.50e9),
    'F6': (438_359_116, 377.28e9, 228.29e9),
    'F7': (499_504_088, 478.78e9, 298.48e9),
    'F0+': (118_824_516, 19.52e9, 11.00e9),
    'F4+': (524_954_484, 333.39e9, 187.62e9),
    'F6+': (728_019_468, 583.52e9, 353.10e9),
    'F7+': (829_551_960, 740.16e9, 461.44e9),
}
NF_RESNET_PARAMS = {'nf_resnet50': 25_557_048, 'nf_resnet101': 44_549_193, 'nf_resnet152': 60_192_858,
                    'nf_resnet200': 64_673_898}
# torchvision's published parameter counts (resnet50/101/152 model docs) and blocks per network.
TORCHVISION_RESNET = {'nf_resnet50': (25_557_032, 16), 'nf_resnet101': (44_549_160, 33),
                      'nf_resnet152': (60_192_808, 50)}


def param_shapes(name, num_classes=1000, size=64, **kw):
  f = hk.transform(lambda x: nfnets.create_model(name, num_classes, **kw)(x, is_training=True))
  return jax.eval_shape(f.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('variant', sorted(NFNET_NUMBERS))
def test_nfnet_params_and_flops(variant):
  n_params, test_macs, train_macs = NFNET_NUMBERS[variant]
  assert count(param_shapes(variant)) == n_params
  spec = nfnets.get_spec(variant)
  assert round(nfnets.count_flops(variant, spec.test_size) / 1e7) == round(test_macs / 1e7)
  assert round(nfnets.count_flops(variant, spec.train_size) / 1e7) == round(train_macs / 1e7)


def test_f0_flops_exact():
  assert nfnets.count_flops('F0', 256) == 12_384_198_656


@pytest.mark.parametrize('name', sorted(NF_RESNET_PARAMS))
def test_nf_resnet_params(name):
  assert count(param_shapes(name)) == NF_RESNET_PARAMS[name]


@pytest.mark.parametrize('name', sorted(TORCHVISION_RESNET))
def test_nf_resnet_is_torchvision_resnet_without_batchnorm(name):
  """An NF-ResNet has ResNet-50/101/152's convs (Brock et al. 2021a); each WS conv's gain and bias replace
  BatchNorm's scale and offset one for one, and each block adds a scalar skip gain. So its count is
  torchvision's plus one per block, and its MACs are ResNet-50's (torchvision: 4.09 GFLOPS at 224)."""
  tv_params, num_blocks = TORCHVISION_RESNET[name]
  assert count(param_shapes(name)) == tv_params + num_blocks
  if name == 'nf_resnet50':
    assert round(nfnets.count_flops(name, 224) / 1e7) == 409


def test_nf_resnet_width_and_depth_overrides():
  """width 1, one block per stage, 10 classes: every shape by the reference's rules (stem 16 * width,
  stages 64/128/256/512 * width, bottleneck out / 4, a shortcut conv in each stage's first block)."""
  p = param_shapes('nf_resnet50', 10, width=1, depths=(1, 1, 1, 1))
  shapes = {m: v['w'].shape for m, v in p.items() if 'w' in v}
  block = lambda cin, mid, out: {'conv0': (1, 1, cin, mid), 'conv1': (3, 3, mid, mid),
                                 'conv2': (1, 1, mid, out), 'conv_shortcut': (1, 1, cin, out)}
  expect = {'NF_ResNet/~/initial_conv': (7, 7, 3, 16), 'NF_ResNet/~/linear': (512, 10)}
  for name, dims in (('', (16, 16, 64)), ('_1', (64, 32, 128)), ('_2', (128, 64, 256)),
                     ('_3', (256, 128, 512))):
    expect.update({f'NF_ResNet/~/nf_res_block{name}/~/{k}': v for k, v in block(*dims).items()})
  assert shapes == expect
  # 2384 (stem) + 4929 + 24193 + 95489 + 379393 (blocks: weights, gain + bias per output, skip gain)
  # + 5130 (linear), summed by hand.
  assert count(p) == 511_518
  # depths (2, 1, 3, 1), width 0.5: 7 blocks, shortcut convs only where a stage starts.
  p = param_shapes('nf_resnet50', 10, width=0.5, depths=(2, 1, 3, 1))
  assert p['NF_ResNet/~/initial_conv']['w'].shape == (7, 7, 3, 8)
  assert sorted(m.split('/')[2] for m in p if m.endswith('conv_shortcut')) == [
      'nf_res_block', 'nf_res_block_2', 'nf_res_block_3', 'nf_res_block_6']
  assert sum(m.endswith('conv2') for m in p) == 7


@pytest.mark.parametrize('bad,match', [(dict(width=0.0), 'width must be'), (dict(width='2'), 'width must be'),
                                       (dict(depths=(1, 1, 1)), 'depths must be'),
                                       (dict(depths=(1, 0, 1, 1)), 'depths must be')])
def test_nf_resnet_bad_shape_overrides(bad, match):
  with pytest.raises(ValueError, match=match):
    param_shapes('nf_resnet26', 10, size=32, **bad)


@pytest.mark.parametrize('name,num_blocks', [('nfnet_tiny', 4), ('nf_resnet26', 8)])
def test_skip_gain_init(name, num_blocks):
  """Every block's skip gain starts at 0 (SkipInit) unless skip_gain_init says otherwise: the initializer
  each skip_gain is created with, evaluated (tracing the init finds them; nothing is compiled)."""
  for init in (0.0, 0.5):
    initializers = []

    def record(next_creator, shape, dtype, initializer, context):
      if context.name == 'skip_gain':
        initializers.append((shape, dtype, initializer))
      return next_creator(shape, dtype, initializer)

    def fwd(x):
      with hk.custom_creator(record):
        return nfnets.create_model(name, 10, skip_gain_init=init)(x, is_training=True)

    jax.eval_shape(hk.transform(fwd).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    gains = [float(initializer(shape, dtype)) for shape, dtype, initializer in initializers]
    assert gains == [init] * num_blocks


def test_f0_param_tree_matches_released_checkpoint_layout():
  p = param_shapes('F0')
  # 7 modules per block (block, conv0, conv1, conv1b, conv2, 2 SE linears) + 4 shortcuts + 4 stem +
  # final_conv + linear = 7*12 + 10 = 94 module entries, as in the reference's F0 tree.
  assert len(p) == 94
  expect = {
      'NFNet/~/stem_conv0': {'w': (3, 3, 3, 16), 'gain': (16,), 'bias': (16,)},
      'NFNet/~/stem_conv1': {'w': (3, 3, 16, 32), 'gain': (32,), 'bias': (32,)},
      'NFNet/~/stem_conv2': {'w': (3, 3, 32, 64), 'gain': (64,), 'bias': (64,)},
      'NFNet/~/stem_conv3': {'w': (3, 3, 64, 128), 'gain': (128,), 'bias': (128,)},
      'NFNet/~/nf_block': {'skip_gain': ()},
      'NFNet/~/nf_block/~/conv0': {'w': (1, 1, 128, 128), 'gain': (128,), 'bias': (128,)},
      'NFNet/~/nf_block/~/conv1': {'w': (3, 3, 128, 128), 'gain': (128,), 'bias': (128,)},
      'NFNet/~/nf_block/~/conv1b': {'w': (3, 3, 128, 128), 'gain': (128,), 'bias': (128,)},
      'NFNet/~/nf_block/~/conv2': {'w': (1, 1, 128, 256), 'gain': (256,), 'bias': (256,)},
      'NFNet/~/nf_block/~/conv_shortcut': {'w': (1, 1, 128, 256), 'gain': (256,), 'bias': (256,)},
      'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': (256, 128), 'b': (128,)},
      'NFNet/~/nf_block/~/squeeze_excite/~/linear_1': {'w': (128, 256), 'b': (256,)},
      'NFNet/~/nf_block_1/~/conv1': {'w': (3, 3, 128, 256), 'gain': (256,), 'bias': (256,)},
      'NFNet/~/nf_block_1/~/conv_shortcut': {'w': (1, 1, 256, 512), 'gain': (512,), 'bias': (512,)},
      'NFNet/~/nf_block_3/~/conv0': {'w': (1, 1, 512, 768), 'gain': (768,), 'bias': (768,)},
      'NFNet/~/nf_block_3/~/conv1': {'w': (3, 3, 128, 768), 'gain': (768,), 'bias': (768,)},
      'NFNet/~/nf_block_9/~/conv_shortcut': {'w': (1, 1, 1536, 1536), 'gain': (1536,), 'bias': (1536,)},
      'NFNet/~/nf_block_11/~/squeeze_excite/~/linear_1': {'w': (768, 1536), 'b': (1536,)},
      'NFNet/~/final_conv': {'w': (1, 1, 1536, 3072), 'gain': (3072,), 'bias': (3072,)},
      'NFNet/~/linear': {'w': (3072, 1000), 'b': (1000,)},
  }
  for module, params in expect.items():
    assert {k: v.shape for k, v in p[module].items()} == params, module
  # Only the first block of each stage has a shortcut conv.
  shortcuts = sorted(m for m in p if m.endswith('conv_shortcut'))
  assert shortcuts == [f'NFNet/~/nf_block{s}/~/conv_shortcut' for s in ('', '_1', '_3', '_9')]


def test_width_scales_the_stages_not_the_stem():
  """The reference NFNet (deepmind-research nfnets/nfnet.py) builds stem_conv0..2 with 16, 32, 64
  channels and stem_conv3 with `width_pattern[0] // 2`, none multiplied by `width`; only the stage
  widths are (`int(block_width * width)`), and the final conv follows the last stage (2x)."""
  p = param_shapes('F0', width=2.0)
  assert [p[f'NFNet/~/stem_conv{i}']['w'].shape for i in range(4)] == [
      (3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
  # Stage 1: out int(256 * 2) = 512, bottleneck (512 * 0.5) // 128 = 2 groups of 128; in: the 128-ch stem.
  assert p['NFNet/~/nf_block/~/conv0']['w'].shape == (1, 1, 128, 256)
  assert p['NFNet/~/nf_block/~/conv2']['w'].shape == (1, 1, 256, 512)
  assert p['NFNet/~/final_conv']['w'].shape == (1, 1, 3072, 6144)


@pytest.mark.parametrize('kw,channels', [
    ({}, 256),  # nfnet_tiny's last stage is 128 wide; the default multiplier is 2
    (dict(final_conv_mult=3), 384),
    (dict(final_conv_ch=100), 256),  # the reference ignores final_conv_ch while a multiplier is set
    (dict(final_conv_mult=None, final_conv_ch=100), 100),
])
def test_final_conv_channels_follow_the_reference_precedence(kw, channels):
  """Reference head: `if final_conv_mult is None: ch = final_conv_ch` else `int(final_conv_mult * ch)`."""
  p = param_shapes('nfnet_tiny', 10, size=32, **kw)
  assert p['NFNet/~/final_conv']['w'].shape == (1, 1, 128, channels)
  assert p['NFNet/~/linear']['w'].shape == (channels, 10)


@pytest.mark.parametrize('kw,match', [
    (dict(final_conv_mult=None), 'both None'),
    (dict(final_conv_mult=None, final_conv_ch=0), 'final_conv_ch must be an integer >= 1, got 0'),
    (dict(final_conv_mult=-1.0), 'final_conv_mult must be a number > 0 or None, got -1.0'),
])
def test_bad_final_conv_arguments(kw, match):
  with pytest.raises(ValueError, match=match):
    param_shapes('nfnet_tiny', 10, size=32, **kw)


def _built_blocks(name, **kw):
  """The residual-block modules a registry model is built with (constructed, no parameters)."""
  box = []
  hk.transform(lambda: box.append(nfnets.create_model(name, 1000, **kw).blocks)).init(None)
  return box[0]


def test_f0_betas_and_stochdepth_rates():
  """Read off the F0 model's own blocks. beta = Var^-1/2 with Var = 1 + k alpha^2 after k blocks of a
  stage, reset at each stage's first block (Brock et al. 2021, Section 3); block i of 12 drops its
  branch with rate 0.25 * i / 12 (the reference's stochdepth_rate * index / num_blocks)."""
  blocks = _built_blocks('F0')
  betas = [1.0, 0.980581, 0.980581, 0.962250, 0.980581, 0.962250, 0.944911, 0.928477, 0.912871,
           0.898027, 0.980581, 0.962250]
  np.testing.assert_allclose([b.spec.beta for b in blocks], betas, atol=1e-6)
  np.testing.assert_allclose([b.stoch_depth.drop_rate for b in blocks], [0.25 * i / 12 for i in range(12)])
  # Grouped convs of the transition blocks: width (out * 0.5) in groups of 128 channels.
  grouped = [(b.conv1.output_channels, b.conv1.feature_group_count) for b in blocks if b.spec.use_projection]
  assert grouped == [(128, 1), (256, 2), (768, 6), (768, 6)]


def _traced_macs(name, size, **kw):
  """MACs read off the model's own conv and linear calls while tracing a forward pass (batch 1)."""
  macs = []

  def interceptor(method, args, kwargs, context):
    out = method(*args, **kwargs)
    m = context.module
    if context.method_name == '__call__' and isinstance(m, layers.WSConv2D):
      kh, kw_ = m.kernel_shape
      cin = args[0].shape[-1] // m.feature_group_count
      macs.append(out.shape[1] * out.shape[2] * kh * kw_ * cin * m.output_channels)
    elif context.method_name == '__call__' and isinstance(m, hk.Linear):
      macs.append(args[0].shape[-1] * m.output_size)
    return out

  def fwd(x):
    with hk.intercept_methods(interceptor):
      return nfnets.create_model(name, 1000, **kw)(x, is_training=False)

  f = hk.transform(fwd)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), x)
  macs.clear()
  jax.eval_shape(f.apply, params, None, x)
  return sum(macs)


@pytest.mark.parametrize('name,size,kw', [
    ('F0', 256, {}), ('F0', 192, dict(width=2.0, depths=(1, 1, 2, 1))), ('nf_resnet50', 224, {}),
    ('nfnet_tiny', 37, dict(use_two_convs=False, final_conv_mult=None, final_conv_ch=100)),
    ('nf_resnet26', 64, dict(width=1, use_se=True)),
])
def test_count_flops_is_the_model_forward(name, size, kw):
  """count_flops reads the plan the model is built from: it equals the MACs of the model's own convs,
  SE linears and classifier at their traced output sizes, for overrides and odd sizes too."""
  assert nfnets.count_flops(name, size, **kw) == _traced_macs(name, size, **kw)


def test_nf_resnet_blocks_use_the_shared_beta_recurrence():
  """NF-ResNet-50 (depths 3, 4, 6, 3) gets the same rule as NFNets (Brock et al. 2021, Section 3):
  block k of a stage (k >= 1) sees Var = 1 + k alpha^2, and a stage's first block sees the previous
  block's 1 + depth alpha^2; beta = Var^-1/2. The plan also states each block's expected output variance."""
  var_in = [1.0, 1.04, 1.08,  1.12, 1.04, 1.08, 1.12,  1.16, 1.04, 1.08, 1.12, 1.16, 1.2,  1.24, 1.04, 1.08]
  var_out = [1.04, 1.08, 1.12,  1.04, 1.08, 1.12, 1.16,  1.04, 1.08, 1.12, 1.16, 1.2, 1.24,  1.04, 1.08, 1.12]
  plan = nfnets.registry.model_plan('nf_resnet50')
  np.testing.assert_allclose([b.beta for b in plan.blocks], np.power(var_in, -0.5), rtol=1e-12)
  np.testing.assert_allclose([b.expected_out_var for b in plan.blocks], var_out, rtol=1e-12)
  np.testing.assert_allclose([b.stochdepth_rate for b in plan.blocks], [0.1 * i / 16 for i in range(16)])
  assert [(b.stage, b.stage_index) for b in plan.blocks if b.stage_index == 0] == [(s, 0) for s in range(4)]
  assert [(b.in_ch, b.width, b.out_ch) for b in plan.blocks if b.use_projection] == [
      (64, 64, 256), (256, 128, 512), (512, 256, 1024), (1024, 512, 2048)]


def test_registry_facts():
  f3p = nfnets.get_spec('F3+')
  assert (f3p.train_size, f3p.test_size, f3p.drop_rate, f3p.ra_layers, f3p.ra_magnitude) == (
      320, 416, 0.4, 4, 15)
  assert nfnets.get_spec('F0').ra_magnitude == 5 and nfnets.get_spec('F1').ra_magnitude == 10


def _apply(name, x, num_classes=10, is_training=False, return_metrics=False, params=None, **kw):
  f = hk.transform(lambda x: nfnets.create_model(name, num_classes, **kw)(
      x, is_training=is_training, return_metrics=return_metrics))
  if params is None:
    params = jax.jit(f.init)(jax.random.PRNGKey(0), x)  # one compile, not one per op
  return params, jax.jit(f.apply)(params, jax.random.PRNGKey(1), x)


def test_forward_shapes_and_metrics():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  _, logits = _apply('nfnet_tiny', x)
  assert logits.shape == (2, 10)
  _, (logits, metrics) = _apply('nfnet_tiny', x, return_metrics=True)
  assert set(metrics) == {'avg_sq_mean', 'avg_var', 'res_avg_var'}
  assert all(v.shape == (4,) for v in metrics.values())
  _, logits = _apply('nf_resnet26', x, drop_rate=0.1, is_training=True)
  assert logits.shape == (2, 10)


def test_blocks_are_identity_at_init():
  """skip_gain = 0: a non-transition block's output equals its input exactly."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  captured = []

  def interceptor(method, args, kwargs, context):
    out = method(*args, **kwargs)
    if isinstance(context.module, nfnets.nfnet.NFBlock) and context.method_name == '__call__':
      captured.append((context.module.spec, args[0], out[0]))
    return out

  def fwd(x):
    with hk.intercept_methods(interceptor):
      return nfnets.create_model('nfnet_tiny', 10, depths=(1, 3, 1, 1))(x, is_training=False)

  f = hk.transform(fwd)
  params = jax.jit(f.init)(jax.random.PRNGKey(0), x)

  def plain_blocks(params, x):
    captured.clear()
    f.apply(params, None, x)
    return [(a, b) for s, a, b in captured if not s.use_projection]

  plain = jax.jit(plain_blocks)(params, x)
  assert len(plain) == 2
  for a, b in plain:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_signal_propagation_follows_beta_rule():
  """With skip gains set to 1 (a trained-like state), on unit-variance Gaussian inputs:

  the first block (beta = 1) keeps unit variance on both paths, each later block of a stage adds
  alpha^2 times its residual-branch variance, and the variance stays bounded with depth.
  """
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 128, 128, 3))
  kw = dict(depths=(1, 4, 1, 1), widths=(64, 128, 256, 256), group_width=16, stem_widths=(16, 32, 64))
  f = hk.transform(lambda x: nfnets.NFNet(10, 'F0', **kw)(x, is_training=False, return_metrics=True))
  params = jax.jit(f.init)(jax.random.PRNGKey(0), x)
  params = hk.data_structures.map(lambda m, n, p: jnp.ones_like(p) if n == 'skip_gain' else p, params)
  _, metrics = jax.jit(f.apply)(params, None, x)
  var, res_var = np.asarray(metrics['avg_var']), np.asarray(metrics['res_avg_var'])
  np.testing.assert_allclose([var[0], res_var[0]], 1.0, rtol=0.15)
  # Stage 2 = blocks 1..4; blocks 2..4 are plain: var_i - var_{i-1} = alpha^2 * res_var_i.
  np.testing.assert_allclose(np.diff(var[1:5]), 0.2 ** 2 * res_var[2:5], rtol=0.3)
  assert (np.diff(var[1:5]) > 0).all()
  assert var.max() < 1.2 and np.asarray(metrics['avg_sq_mean']).max() < 0.05


@pytest.mark.parametrize('shape', [(3, 3, 8, 5), (1, 1, 40, 5)])
def test_ws_conv_standardises_weights(shape):
  w = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
  gain = jnp.linspace(0.5, 2.0, 5)
  w_hat = np.asarray(layers.standardize_weight(w, gain))
  fan_in = int(np.prod(shape[:-1]))
  assert w_hat.shape == shape
  np.testing.assert_allclose(w_hat.reshape(-1, 5).mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(w_hat.reshape(-1, 5).var(0) * fan_in, np.asarray(gain) ** 2, rtol=1e-4)
  # NumPy reference formula: gain * (w - mean) / sqrt(max(fan_in * var, 1e-4))
  wn = np.asarray(w).reshape(-1, 5)
  ref = (wn - wn.mean(0)) / np.sqrt(np.maximum(wn.var(0) * fan_in, 1e-4)) * np.asarray(gain)
  np.testing.assert_allclose(w_hat.reshape(-1, 5), ref, rtol=1e-5, atol=1e-6)


def test_activation_gammas_preserve_variance():
  x = jax.random.normal(jax.random.PRNGKey(0), (1_000_000,))
  for name in ('relu', 'gelu', 'silu'):
    y = layers.activation(name)(x)
    assert abs(float(jnp.var(y)) - 1.0) < 0.02, name


def test_stoch_depth_is_batchwise_and_unscaled():
  x = jnp.ones((1000, 2, 2, 3))
  f = hk.transform(lambda x, t: layers.StochDepth(0.3)(x, t))
  y = np.asarray(f.apply({}, jax.random.PRNGKey(0), x, True))
  per_example = y.reshape(1000, -1)
  assert set(np.unique(per_example)) <= {0.0, 1.0}  # no 1/keep rescale
  assert (per_example.min(1) == per_example.max(1)).all()  # whole example kept or dropped
  assert abs(per_example[:, 0].mean() - 0.7) < 0.05
  np.testing.assert_array_equal(np.asarray(f.apply({}, None, x, False)), np.asarray(x))


@pytest.mark.parametrize('bad', [dict(name='F9'), dict(name='resnet50'), dict(num_classes=0)])
def test_bad_model_arguments(bad):
  kw = dict(name='F0', num_classes=10)
  kw.update(bad)
  with pytest.raises(ValueError, match=str(bad.get('name', bad.get('num_classes')))):
    param_shapes(kw['name'], kw['num_classes'])


def test_bad_image_rank():
  with pytest.raises(ValueError, match='rank-4 NHWC'):
    _apply('nfnet_tiny', jnp.zeros((32, 32, 3)))


def test_unknown_variant_lists_accepted():
  f = hk.transform(lambda x: nfnets.NFNet(10, variant='F9')(x, is_training=False))
  with pytest.raises(ValueError, match="accepted: .*'F0'"):
    f.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
