"""Weight import/export: released DeepMind pickles, timm state dicts and flat .npz (nfnets.weights).

Trees are random NumPy arrays shaped by `jax.eval_shape` of the registry model (no init, no forward pass),
so the whole file runs in seconds. F0/F1 trees whose values are never read are zero-stride broadcasts.
"""
import os
import pickle

import dill
import numpy as np
import pytest

from nfnets import weights

TINY = 'nfnet_tiny'


def random_tree(model, num_classes=1000, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  shapes = weights.expected_shapes(model, num_classes)
  if np.issubdtype(dtype, np.integer):
    make = lambda s: rng.integers(-128, 128, size=s, dtype=dtype)
  else:
    make = lambda s: rng.standard_normal(s).astype(dtype)
  return {m: {n: make(s) for n, s in ps.items()} for m, ps in shapes.items()}


def shape_only_tree(model, num_classes=1000):
  """A tree with the model's shapes and no memory: every leaf is a broadcast scalar."""
  zero = np.zeros((), np.float32)
  return {m: {n: np.broadcast_to(zero, s) for n, s in ps.items()}
          for m, ps in weights.expected_shapes(model, num_classes).items()}


def assert_trees_equal(a, b):
  assert sorted(a) == sorted(b)
  for m in a:
    assert sorted(a[m]) == sorted(b[m]), m
    for n in a[m]:
      assert a[m][n].shape == b[m][n].shape and a[m][n].dtype == b[m][n].dtype, (m, n)
      np.testing.assert_array_equal(a[m][n], b[m][n])


@pytest.fixture(scope='module')
def tiny():
  return random_tree(TINY, num_classes=10)


# ---------------------------------------------------------------------------------------------------------
# Flat .npz.


def test_flatten_rule(tiny):
  flat = weights.flatten(tiny)
  assert 'NFNet/~/nf_block/~/conv0/w' in flat
  assert 'NFNet/~/nf_block_1/skip_gain' in flat
  assert 'NFNet/~/nf_block/~/squeeze_excite/~/linear_1/b' in flat
  assert_trees_equal(weights.unflatten(flat), tiny)


def test_npz_round_trip(tiny, tmp_path):
  path = tmp_path / 'tiny.npz'
  weights.export_npz(tiny, path)
  assert_trees_equal(weights.load_npz(path), tiny)
  # load_released also accepts our flat .npz, detects the model and takes num_classes from the head.
  assert_trees_equal(weights.load_released(path), tiny)
  with np.load(path, allow_pickle=False) as z:  # readable by plain NumPy, without pickles
    np.testing.assert_array_equal(z['NFNet/~/linear/w'], tiny['NFNet/~/linear']['w'])
  assert os.listdir(tmp_path) == ['tiny.npz']  # no temporary files left behind


def test_failed_export_keeps_old_file(tiny, tmp_path):
  path = tmp_path / 'w.npz'
  weights.export_npz(tiny, path)
  before = path.read_bytes()
  broken = dict(tiny)
  broken['NFNet/~/bad'] = {'w': object()}  # np.asarray -> object array; write_array refuses pickles
  with pytest.raises(ValueError):
    weights.export_npz(broken, path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['w.npz']


# ---------------------------------------------------------------------------------------------------------
# timm.


def test_timm_round_trip_tiny(tiny, tmp_path):
  sd = weights.to_timm(tiny)
  assert sd['stem.conv4.gain'].shape == (16, 1, 1, 1)
  assert sd['stages.0.0.attn_last.fc1.weight'].shape == (16, 32, 1, 1)
  assert_trees_equal(weights.load_timm(sd, TINY), tiny)
  assert_trees_equal(weights.load_timm(sd), tiny)  # model detected
  path = weights.save_timm(tiny, tmp_path / 'tiny_timm')
  assert_trees_equal(weights.load_timm(path, TINY), tiny)


def test_timm_f0_names_shapes_and_round_trip():
  # int8 values keep the F0 round trip (71.5M entries) cheap; the mapping does not look at dtypes.
  f0 = random_tree('F0', dtype=np.int8)
  sd = weights.to_timm(f0)
  assert len(sd) == 233
  assert sum(v.size for v in sd.values()) == 71_489_284 == weights.count_params(f0)
  expected = {  # names and shapes of timm's dm_nfnet_f0 state dict (timm/models/nfnet.py)
      'stem.conv1.weight': (16, 3, 3, 3),
      'stem.conv4.gain': (128, 1, 1, 1),
      'stages.0.0.downsample.conv.weight': (256, 128, 1, 1),
      'stages.0.0.skipinit_gain': (),
      'stages.1.0.conv2.weight': (256, 128, 3, 3),
      'stages.2.5.conv2b.weight': (768, 128, 3, 3),
      'stages.3.2.attn_last.fc2.bias': (1536,),
      'stages.3.2.attn_last.fc1.weight': (768, 1536, 1, 1),
      'final_conv.weight': (3072, 1536, 1, 1),
      'head.fc.weight': (1000, 3072),
      'head.fc.bias': (1000,),
  }
  for name, shape in expected.items():
    assert sd[name].shape == shape, name
  assert 'stages.2.1.downsample.conv.weight' not in sd
  assert sorted({k.split('.')[1] + '.' + k.split('.')[2] for k in sd if k.startswith('stages.')}) == sorted(
      f'{s}.{b}' for s, d in enumerate((1, 2, 6, 3)) for b in range(d))
  # Values land where the table says: HWIO -> OIHW, (I,O) -> (O,I,1,1), (I,O) -> (O,I).
  np.testing.assert_array_equal(sd['stages.2.5.conv2b.weight'],
                                f0['NFNet/~/nf_block_8/~/conv1b']['w'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd['stages.3.2.attn_last.fc1.weight'][:, :, 0, 0],
                                f0['NFNet/~/nf_block_11/~/squeeze_excite/~/linear']['w'].T)
  np.testing.assert_array_equal(sd['head.fc.weight'], f0['NFNet/~/linear']['w'].T)
  assert_trees_equal(weights.load_timm(sd, 'dm_nfnet_f0'), f0)


def test_timm_unknown_names_reported():
  sd = weights.to_timm(shape_only_tree(TINY, 10))
  sd['stages.0.0.conv9.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  sd['head.fc.gain'] = np.zeros((10,), np.float32)
  with pytest.raises(weights.WeightsError, match=r'(?s)head\.fc\.gain.*stages\.0\.0\.conv9\.weight'):
    weights.from_timm(sd)


def test_timm_file_formats_need_optional_packages(tmp_path):
  for suffix, package in (('.safetensors', 'safetensors'), ('.pth', 'torch')):
    path = tmp_path / f'w{suffix}'
    path.write_bytes(b'\0' * 16)
    try:
      __import__(package)
    except ImportError:
      with pytest.raises(ImportError, match=f'pip install {package}'):
        weights.load_timm(path, TINY)
    else:
      with pytest.raises(weights.WeightsError, match='w' + suffix.replace('.', r'\.')):
        weights.load_timm(path, TINY)


# ---------------------------------------------------------------------------------------------------------
# Released pickles.


def _dump(obj, path, how):
  data = {'pickle2': lambda o: pickle.dumps(o, protocol=2), 'pickle5': lambda o: pickle.dumps(o, protocol=5),
          'dill': dill.dumps}[how](obj)
  path.write_bytes(data)
  return path


@pytest.mark.parametrize('how', ['pickle2', 'pickle5', 'dill'])
@pytest.mark.parametrize('container', ['dict', 'flatmapping', 'jax'])
def test_released_formats_load(tiny, tmp_path, container, how):
  if container == 'dict':
    obj = tiny
  elif container == 'flatmapping':
    # Haiku's FlatMap pickles as (haiku._src.data_structures.FlatMapping, (mapping,)), the 2021 form.
    from haiku._src import data_structures
    obj = data_structures.FlatMap({m: data_structures.FlatMap(ps) for m, ps in tiny.items()})
    assert b'FlatMapping' in pickle.dumps(obj)
  else:  # leaves as jax Arrays, which pickle via jax._src.array._reconstruct_array
    import jax.numpy as jnp
    obj = {m: {n: jnp.asarray(x) for n, x in ps.items()} for m, ps in tiny.items()}
  path = _dump(obj, tmp_path / 'F_haiku.npz', how)
  loaded = weights.load_released(path, TINY, num_classes=10)
  assert type(loaded) is dict and all(type(v) is dict for v in loaded.values())
  assert all(type(x) is np.ndarray for ps in loaded.values() for x in ps.values())
  assert_trees_equal(loaded, tiny)


def test_numpy1_pickle_names_load(tiny, tmp_path):
  # Files written under NumPy 1.x (as in 2021) name numpy.core.multiarray; protocol 2 stores names as text.
  data = pickle.dumps(tiny, protocol=2)
  assert b'numpy._core.multiarray' in data
  path = tmp_path / 'np1.npz'
  path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
  assert_trees_equal(weights.load_released(path, TINY), tiny)


class _Evil:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _EvalEvil:
  def __reduce__(self):
    return eval, ("__import__('os').system('true')",)


@pytest.mark.parametrize('how', ['pickle2', 'pickle5', 'dill'])
def test_malicious_pickle_refused(tiny, tmp_path, how):
  marker = tmp_path / 'pwned'
  tree = {m: dict(ps) for m, ps in tiny.items()}
  tree['NFNet/~/linear']['b'] = _Evil(f'touch {marker}')
  path = _dump(tree, tmp_path / 'evil.npz', how)
  with pytest.raises(weights.UnsafePickleError,
                     match=r"refusing to unpickle '(posix|nt|os)\.system': released NFNet weights contain only"):
    weights.load_released(path)
  assert not marker.exists()
  path = _dump({'x': _EvalEvil()}, tmp_path / 'eval.npz', how)
  with pytest.raises(weights.UnsafePickleError, match=r"'builtins\.eval'"):
    weights.load_released(path)


def test_object_arrays_refused(tmp_path):
  path = _dump({'NFNet/~/linear': {'w': np.array([1, 'a'], dtype=object)}}, tmp_path / 'o.npz', 'pickle5')
  with pytest.raises(weights.WeightsError, match='object'):
    weights.read_released(path)


# ---------------------------------------------------------------------------------------------------------
# Checks against the model, and broken files.


def test_all_mismatches_reported_at_once(tiny, tmp_path):
  tree = {m: dict(ps) for m, ps in tiny.items()}
  del tree['NFNet/~/nf_block_2/~/conv1b']
  tree['NFNet/~/extra'] = {'w': np.zeros((3,), np.float32)}
  tree['NFNet/~/stem_conv0']['w'] = np.zeros((3, 3, 3, 9), np.float32)
  path = _dump(tree, tmp_path / 'bad.npz', 'pickle5')
  with pytest.raises(weights.WeightsError) as info:
    weights.load_released(path, TINY)
  msg = str(info.value)
  assert str(path) in msg and "'nfnet_tiny'" in msg
  assert '3 missing, 1 unexpected, 1 wrong shape' in msg
  for name in ('w', 'gain', 'bias'):
    assert f'missing:     NFNet/~/nf_block_2/~/conv1b/{name}' in msg
  assert 'unexpected:  NFNet/~/extra/w (3,)' in msg
  assert 'wrong shape: NFNet/~/stem_conv0/w checkpoint (3, 3, 3, 9), model (3, 3, 3, 8)' in msg


def test_variant_detection():
  assert weights.detect_model(shape_only_tree('F1')) == 'F1'
  assert weights.detect_model(shape_only_tree('F0+')) == 'F0+'
  assert weights.detect_model(shape_only_tree('F0', num_classes=10)) == 'F0'


def test_wrong_variant_is_a_clear_error(tiny, tmp_path):
  with pytest.raises(weights.WeightsError,
                     match=r"checkpoint has 24 blocks, 'F0' has 12 \(checkpoint looks like F1"):
    weights.validate(shape_only_tree('F1'), 'F0')
  path = _dump(tiny, tmp_path / 'tiny.pkl', 'pickle5')
  with pytest.raises(weights.WeightsError,
                     match=r"has 4 blocks, 'F0' has 12 \(checkpoint looks like nfnet_tiny"):
    weights.load_released(path, 'F0')


def test_truncated_and_missing_files(tiny, tmp_path):
  full = pickle.dumps(tiny, protocol=4)
  for cut in (len(full) // 2, len(full) - 1, 10):
    path = tmp_path / f'cut{cut}.npz'
    path.write_bytes(full[:cut])
    with pytest.raises(weights.WeightsError, match=f'{path}: truncated or corrupt'):
      weights.load_released(path)
  npz = tmp_path / 'flat.npz'
  weights.export_npz(tiny, npz)
  npz.write_bytes(npz.read_bytes()[:-100])
  with pytest.raises(weights.WeightsError, match=f'{npz}: truncated or corrupt'):
    weights.load_released(npz)
  missing = tmp_path / 'F0_haiku.npz'
  with pytest.raises(FileNotFoundError, match='F0_haiku.npz'):
    weights.load_released(missing)
  with pytest.raises(FileNotFoundError):
    weights.load_npz(missing)
  with pytest.raises(FileNotFoundError):
    weights.load_timm(tmp_path / 'x.safetensors')


# ---------------------------------------------------------------------------------------------------------
# read() and fit_to_template(), as train_io uses them for --init_from and predict.


def test_read_dispatches_on_file_type(tiny, tmp_path):
  pickled = _dump(tiny, tmp_path / 'F_haiku.npz', 'dill')
  weights.export_npz(tiny, tmp_path / 'flat.npz')
  timm_npz = weights.save_timm(tiny, tmp_path / 'timm.npz')
  for path in (pickled, tmp_path / 'flat.npz', timm_npz):
    assert_trees_equal(weights.read(path), tiny)
  with np.load(timm_npz, allow_pickle=False) as z:  # the timm file really holds timm names
    sd = {k: z[k] for k in z.files}
  assert 'stem.conv1.weight' in sd and not any('/' in k for k in sd)
  sd['stages.0.0.conv9.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  bad = tmp_path / 'bad_timm.npz'
  np.savez(bad, **sd)
  with pytest.raises(weights.WeightsError, match=rf'(?s){bad}: .*stages\.0\.0\.conv9\.weight'):
    weights.read(bad)
  (tmp_path / 'w.pth').write_bytes(b'\0' * 16)
  try:
    __import__('torch')
  except ImportError:
    with pytest.raises(ImportError, match='pip install torch'):
      weights.read(tmp_path / 'w.pth')
  else:
    with pytest.raises(weights.WeightsError, match=r'w\.pth'):
      weights.read(tmp_path / 'w.pth')
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    weights.read(tmp_path / 'missing.npz')


def test_fit_to_template_keeps_weights_and_reinitialises_a_new_classifier(tiny):
  template = random_tree(TINY, num_classes=7, seed=1)
  loaded = {m: {n: x.astype(np.float64) for n, x in ps.items()} for m, ps in tiny.items()}
  fitted = weights.fit_to_template(loaded, template, source='tiny.npz')
  assert sorted(fitted) == sorted(template)
  for m, ps in template.items():
    for n, fresh in ps.items():
      assert fitted[m][n].dtype == fresh.dtype, (m, n)  # cast to the template's dtype
      want = fresh if m == 'NFNet/~/linear' else tiny[m][n]  # the 10-class head does not fit 7 classes
      np.testing.assert_array_equal(fitted[m][n], want.astype(fresh.dtype))
  bad = {m: dict(ps) for m, ps in tiny.items()}
  bad['NFNet/~/final_conv']['w'] = np.zeros((1, 1, 128, 64), np.float32)
  del bad['NFNet/~/stem_conv0']['bias']
  bad['NFNet/~/extra'] = {'w': np.zeros((3,), np.float32)}
  with pytest.raises(weights.WeightsError, match='Weights in tiny.npz do not fit this model') as info:
    weights.fit_to_template(bad, template, source='tiny.npz')
  msg = str(info.value)
  assert '(3 problems)' in msg and 'NFNet/~/stem_conv0/bias: missing' in msg
  assert 'NFNet/~/final_conv/w: shape (1, 1, 128, 64) vs (1, 1, 128, 256)' in msg
  assert 'NFNet/~/extra/w: not in this model' in msg


def test_export_weights_cli(tiny, tmp_path, capsys):
  from tools import export_weights
  released = _dump(tiny, tmp_path / 'F_haiku.npz', 'dill')
  assert export_weights.main([str(released), str(tmp_path / 'timm.npz'), '--to', 'timm']) == 0
  assert export_weights.main([str(tmp_path / 'timm.npz'), str(tmp_path / 'flat.npz')]) == 0
  assert_trees_equal(weights.load_npz(tmp_path / 'flat.npz'), tiny)
  assert export_weights.main([str(released), str(tmp_path / 'x.npz'), '--model', 'F0']) == 2
  assert "'F0'" in capsys.readouterr().err
  assert not (tmp_path / 'x.npz').exists()
