"""Import and export of NFNet weights: DeepMind's released Haiku files, timm state dicts and plain .npz.

Parameters are Haiku's two-level tree `{module_path: {param_name: array}}`, e.g.
`params['NFNet/~/nf_block_3/~/conv1']['w']`. Every loader returns that tree as plain dicts of NumPy arrays
(`net.apply` accepts them directly) after checking names and shapes against the registry model.

Formats:
- Released DeepMind weights (`F0_haiku.npz` .. `F6_haiku.npz`): despite the name, dill pickles of the tree,
  possibly wrapped in Haiku's 2021 `FlatMapping`. They are read with a restricted unpickler that can rebuild
  only dicts and numeric NumPy arrays (`ALLOWED_PICKLE_GLOBALS`), so a tampered file cannot run code.
  Haiku need not be importable to read them.
- Flat .npz (`export_npz` / `load_npz`): one array per parameter, no pickles. The flattening rule is
  `key = module_path + '/' + param_name` (e.g. `'NFNet/~/nf_block/~/conv0/w'`); Haiku parameter names never
  contain '/', so `unflatten` splits each key at its last '/'.
- timm `dm_nfnet_f*` state dicts (`to_timm` / `load_timm` / `save_timm`), mapped per the table in
  reference/ecosystem.md §1.5: convs OIHW <-> HWIO, gains (O,1,1,1) <-> (O,), SE linears as 1x1 convs
  (O,I,1,1) <-> (I,O), classifier `head.fc` (O,I) <-> (I,O).

Every write goes to a temporary file in the destination folder that replaces the destination only once
complete, so a failed export never leaves a half-written file under the final name.
"""
import _compat_pickle
import collections
import errno
import functools
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

Params = Dict[str, Dict[str, np.ndarray]]
PathLike = Union[str, 'os.PathLike[str]']

_SEP = '/'  # between a module path and its parameter name in flat keys
_ROOT = 'NFNet'


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or whose parameters do not fit the model."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
  """A pickle that asks for something other than dicts and numeric arrays."""


# ----------------------------------------------------------------------------------------------------------
# Flat names.


def flatten(params: Mapping[str, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """`{module: {name: x}}` -> `{module + '/' + name: np.asarray(x)}`, sorted by key."""
  flat = {}
  for module in sorted(params):
    for name in sorted(params[module]):
      if _SEP in name:
        raise CheckpointError(f'Parameter name {name!r} of module {module!r} contains {_SEP!r}; '
                              'flat names would be ambiguous')
      flat[f'{module}{_SEP}{name}'] = np.asarray(params[module][name])
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """Inverse of `flatten`: splits each key at its last '/' into module path and parameter name."""
  params: Dict[str, Dict[str, Any]] = {}
  for key, value in flat.items():
    module, sep, name = key.rpartition(_SEP)
    if not sep or not module or not name:
      raise CheckpointError(f'Flat parameter key {key!r} is not of the form "module/path/param_name"')
    params.setdefault(module, {})[name] = value
  return params


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling of released weights.

try:
  from numpy._core.multiarray import _reconstruct as _np_reconstruct_impl
  from numpy._core.multiarray import scalar as _np_scalar_impl
  from numpy._core.numeric import _frombuffer as _np_frombuffer_impl
except ImportError:  # NumPy 1.x
  from numpy.core.multiarray import _reconstruct as _np_reconstruct_impl  # type: ignore
  from numpy.core.multiarray import scalar as _np_scalar_impl  # type: ignore
  from numpy.core.numeric import _frombuffer as _np_frombuffer_impl  # type: ignore


def _refuse_objects(dtype: np.dtype) -> np.dtype:
  if dtype.hasobject:
    raise UnsafePickleError(f'refusing to unpickle an array of dtype {dtype}: released NFNet weights '
                            'contain only numeric arrays')
  return dtype


def _safe_dtype(*args):
  return _refuse_objects(np.dtype(*args))


class _NdarrayToken:
  """What the global `numpy.ndarray` unpickles to: usable only as `_reconstruct`'s first argument."""


_NDARRAY = _NdarrayToken()


def _safe_reconstruct(subtype, shape, dtype_code):
  # NumPy pickles every array as `_reconstruct(ndarray, (0,), b'b')` followed by `__setstate__`.
  if subtype is not _NDARRAY or tuple(np.atleast_1d(shape)) != (0,):
    raise UnsafePickleError(f'refusing _reconstruct({subtype!r}, {shape!r}): only empty numpy.ndarray '
                            'shells are rebuilt')
  return _np_reconstruct_impl(np.ndarray, (0,), dtype_code)


def _safe_scalar(dtype, *args):
  return _np_scalar_impl(_refuse_objects(np.dtype(dtype)), *args)


def _safe_frombuffer(buf, dtype, shape, order):
  return _np_frombuffer_impl(buf, _refuse_objects(np.dtype(dtype)), shape, order)


def _array_from_state(fun, args, state) -> np.ndarray:
  if fun is not _safe_reconstruct:
    raise UnsafePickleError(f'refusing to rebuild an array with {fun!r}')
  array = fun(*args)
  array.__setstate__(state)
  return array


def _safe_dill_create_array(fun, args, state, npdict=None):
  # dill's `_create_array(f, args, state, npdict)`; npdict only exists for ndarray subclasses.
  if npdict:
    raise UnsafePickleError('refusing to unpickle an ndarray subclass with instance attributes')
  return _array_from_state(fun, args, state)


def _safe_jax_array(fun, args, arr_state, aval_state):
  # jax.Array.__reduce__ forwards to NumPy; the result stays a host NumPy array.
  del aval_state
  return _array_from_state(fun, args, arr_state)


def _plain_dict(data=(), *unused):
  """Stand-in for Haiku's FlatMapping / FlatMap / frozendict: `(cls, (mapping_or_items,))` -> dict."""
  del unused
  out = dict(data)
  return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in out.items()}


def _latin1_encode(text, encoding='latin1'):
  # Protocol-2 pickles store bytes as `_codecs.encode(str, 'latin1')`.
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise UnsafePickleError(f'refusing _codecs.encode with encoding {encoding!r}')
  return text.encode('latin1')


def _allowed_globals() -> Dict[Tuple[str, str], Callable[..., Any]]:
  allowed: Dict[Tuple[str, str], Callable[..., Any]] = {
      ('numpy', 'ndarray'): _NDARRAY,
      ('numpy', 'dtype'): _safe_dtype,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('_codecs', 'encode'): _latin1_encode,
      ('dill._dill', '_create_array'): _safe_dill_create_array,
      ('jax._src.array', '_reconstruct_array'): _safe_jax_array,
  }
  for core in ('numpy.core', 'numpy._core'):
    allowed[(f'{core}.multiarray', '_reconstruct')] = _safe_reconstruct
    allowed[(f'{core}.multiarray', 'scalar')] = _safe_scalar
    allowed[(f'{core}.numeric', '_frombuffer')] = _safe_frombuffer
  for module in ('haiku._src.data_structures', 'haiku.data_structures'):
    for name in ('FlatMapping', 'FlatMap', 'frozendict'):
      allowed[(module, name)] = _plain_dict
  return allowed


_ALLOWED = _allowed_globals()
# The pickle globals a released-weights file may name; anything else is refused.
ALLOWED_PICKLE_GLOBALS = tuple(sorted(f'{m}.{n}' for m, n in _ALLOWED))


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds only dicts, Haiku mappings (as dicts) and numeric NumPy arrays."""

  def find_class(self, module, name):
    # Protocol-2 pickles use Python 2 module names ('__builtin__'); name the global as Python 3 does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    target = _ALLOWED.get((module, name))
    if target is None:
      raise UnsafePickleError(f"refusing to unpickle '{module}.{name}': released NFNet weights contain "
                              'only dicts and arrays')
    return target

  def persistent_load(self, pid):
    raise UnsafePickleError('refusing a pickle with persistent ids: released NFNet weights contain only '
                            'dicts and arrays')


# ----------------------------------------------------------------------------------------------------------
# Reading files.


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(errno.ENOENT, 'No checkpoint file at this path', path)


def _is_zip(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(4) == b'PK\x03\x04'


def _read_npz_flat(path: str) -> Dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise CheckpointError(f'{path}: truncated or corrupt .npz checkpoint ({type(e).__name__}: {e})') from e


def _unpickle(path: str) -> Any:
  with open(path, 'rb') as f:
    try:
      return _RestrictedUnpickler(f).load()
    except CheckpointError as e:
      raise type(e)(f'{e} (file: {path})') from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, UnicodeDecodeError) as e:
      raise CheckpointError(f'{path}: truncated or corrupt checkpoint, not a complete pickle of '
                            f'parameter arrays ({type(e).__name__}: {e})') from e


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic))


def _as_param_tree(obj: Any, source: str) -> Params:
  """Normalizes a loaded object to `{module: {name: ndarray}}`, refusing anything that is not numeric."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{source}: expected a mapping of parameters, got {type(obj).__name__}')
  if 'params' in obj and isinstance(obj['params'], Mapping) and set(obj) <= {'params', 'state'}:
    obj = obj['params']  # {'params': ..., 'state': ...} as written by some training loops
  if obj and all(_is_array(v) for v in obj.values()):
    obj = _unflatten_file(obj, source)
  params: Params = {}
  bad = []
  for module, inner in obj.items():
    if not isinstance(module, str) or not isinstance(inner, Mapping):
      bad.append(f'{module!r}: {type(inner).__name__}')
      continue
    params[module] = {}
    for name, value in inner.items():
      if not isinstance(name, str) or not _is_array(value) or np.asarray(value).dtype.kind not in 'biuf':
        bad.append(f'{module}/{name}: {type(value).__name__} {getattr(value, "dtype", "")}'.rstrip())
      else:
        params[module][name] = np.asarray(value)
  if bad:
    raise CheckpointError(f'{source}: not a two-level {{module: {{name: numeric array}}}} tree; offending '
                          'entries:\n  ' + '\n  '.join(bad))
  return params


def _unflatten_file(flat: Mapping[str, Any], path: str) -> Dict[str, Dict[str, Any]]:
  try:
    return unflatten(flat)
  except CheckpointError as e:
    hint = ' (a timm state dict? use load_timm)' if any(k.startswith('stem.') for k in flat) else ''
    raise CheckpointError(f'{path}: {e}{hint}') from None


def read_released(path: PathLike) -> Params:
  """Reads a released `F*_haiku.npz` (a dill pickle) or a flat .npz into a tree, without model checks."""
  path = os.fspath(path)
  _check_exists(path)
  if _is_zip(path):
    return _as_param_tree(_unflatten_file(_read_npz_flat(path), path), path)
  return _as_param_tree(_unpickle(path), path)


# ----------------------------------------------------------------------------------------------------------
# Checking a tree against a registry model.

_BLOCK = re.compile(r'^nf_block(?:_(\d+))?$')


def _block_modules(params: Mapping[str, Any]) -> List[str]:
  return [m for m in params if len(m.split('/~/')) == 2 and _BLOCK.match(m.split('/~/')[1])]


def _model_blocks(name: str) -> Optional[int]:
  from nfnets import nfnet, registry  # pylint: disable=g-import-not-at-top
  spec = registry.get_spec(name)
  if spec.constructor is not nfnet.NFNet:
    return None
  depths = spec.kwargs.get('depths') or nfnet.get_variant(spec.kwargs['variant']).depths
  return int(sum(depths))


def _num_classes(params: Mapping[str, Any], default: int = 1000) -> int:
  """Width of the classifier, a top-level `<root>/~/linear`; `default` if there is none."""
  for module, ps in params.items():
    parts = module.split('/~/')
    if len(parts) == 2 and parts[1] == 'linear' and 'w' in ps and len(np.shape(ps['w'])) == 2:
      return int(np.shape(ps['w'])[1])
  return default


def expected_shapes(model_name: str, num_classes: int = 1000) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  """`{module: {name: shape}}` of a registry model, from `jax.eval_shape` of its init (no arrays made)."""
  return {m: dict(ps) for m, ps in _expected_shapes(model_name, num_classes).items()}


@functools.lru_cache(maxsize=16)
def _expected_shapes(model_name: str, num_classes: int) -> Dict[str, Dict[str, Tuple[int, ...]]]:
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  spec = registry.get_spec(model_name)
  f = hk.transform(lambda x: registry.create_model(model_name, num_classes)(x, is_training=False))
  images = jax.ShapeDtypeStruct((1, spec.train_size, spec.train_size, 3), jnp.float32)
  shapes = jax.eval_shape(f.init, jax.random.PRNGKey(0), images)
  return {m: {n: tuple(v.shape) for n, v in ps.items()} for m, ps in shapes.items()}


def _mismatches(params: Mapping[str, Mapping[str, Any]], expected) -> List[str]:
  missing, unexpected, wrong = [], [], []
  for module in sorted(set(expected) | set(params)):
    want, got = expected.get(module, {}), params.get(module, {})
    for name in sorted(set(want) | set(got)):
      key = f'{module}/{name}'
      if name not in got:
        missing.append(f'  missing:     {key} {want[name]}')
      elif name not in want:
        unexpected.append(f'  unexpected:  {key} {tuple(np.shape(got[name]))}')
      elif tuple(np.shape(got[name])) != tuple(want[name]):
        wrong.append(f'  wrong shape: {key} checkpoint {tuple(np.shape(got[name]))}, model {want[name]}')
  return missing + unexpected + wrong


def _nfnet_names() -> List[str]:
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  return [n for n in registry.MODELS if _model_blocks(n) is not None]


def detect_model(params: Mapping[str, Mapping[str, Any]], num_classes: Optional[int] = None) -> str:
  """The registry NFNet whose parameter names and shapes a tree matches (e.g. 'F1', 'F0+', 'nfnet_tiny').

  Candidates are the NFNets with the tree's count of `nf_block` modules; widths decide between F and F+.
  """
  num_classes = _num_classes(params) if num_classes is None else num_classes
  n_blocks = len(_block_modules(params))
  candidates = [n for n in _nfnet_names() if _model_blocks(n) == n_blocks]
  for name in candidates:
    if not _mismatches(params, _expected_shapes(name, num_classes)):
      return name
  by_blocks = ', '.join(f'{n}={_model_blocks(n)}' for n in _nfnet_names())
  if not candidates:
    raise CheckpointError(f'No registered NFNet has {n_blocks} nf_block modules (blocks per model: '
                          f'{by_blocks}); pass model_name to see every mismatch')
  raise CheckpointError(f'The tree has {n_blocks} blocks like {candidates}, but its names or shapes match '
                        f'none of them at num_classes={num_classes}; pass model_name to see every mismatch')


def validate(params: Mapping[str, Mapping[str, Any]], model_name: Optional[str] = None,
             num_classes: Optional[int] = None, source: str = 'checkpoint') -> str:
  """Checks names and shapes against a registry model, reporting every mismatch in one error.

  Args:
    model_name: registry name ('F0', 'F3+', 'nfnet_tiny', ...) or timm name ('dm_nfnet_f0'); None detects it.
    num_classes: None takes the classifier's width from the tree.
    source: what to call the tree in errors (usually its file).
  Returns:
    The registry model name.
  """
  num_classes = _num_classes(params) if num_classes is None else num_classes
  if model_name is None:
    try:
      return detect_model(params, num_classes)
    except CheckpointError as e:
      raise CheckpointError(f'{source}: {e}') from None
  model_name = registry_name(model_name)
  bad = _mismatches(params, _expected_shapes(model_name, num_classes))
  if bad:
    header = f'{source}: parameters do not match model {model_name!r} (num_classes={num_classes})'
    have, want = len(_block_modules(params)), _model_blocks(model_name)
    if want is not None and have != want:
      alike = [n for n in _nfnet_names() if _model_blocks(n) == have]
      header += (f'; the checkpoint has {have} blocks, {model_name!r} has {want}'
                 + (f' (checkpoint looks like {" or ".join(alike)})' if alike else ''))
    counts = {k: sum(line.lstrip().startswith(k) for line in bad) for k in ('missing', 'unexpected', 'wrong')}
    header += (f': {counts["missing"]} missing, {counts["unexpected"]} unexpected, '
               f'{counts["wrong"]} wrong shape')
    raise CheckpointError(header + '\n' + '\n'.join(bad))
  return model_name


def registry_name(name: str) -> str:
  """Registry name for a registry or timm model name: 'dm_nfnet_f3.dm_in1k' -> 'F3'."""
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  m = re.fullmatch(r'dm_nfnet_f(\d)(?:\.\w+)?', name)
  if m:
    name = f'F{m.group(1)}'
  registry.get_spec(name)  # raises with the accepted names
  return name


def load_released(path: PathLike, model_name: Optional[str] = None,
                  num_classes: Optional[int] = None) -> Params:
  """Loads DeepMind's released `F{0..6}_haiku.npz` (dill pickle) or a flat .npz from `export_npz`.

  Args:
    model_name: registry name to check against; None detects the variant from the tree.
    num_classes: None takes it from the classifier in the file.
  Returns:
    `{module: {name: np.ndarray}}` in the file's dtype (float32 for the released files), ready for
    `hk.transform(...).apply`.
  """
  path = os.fspath(path)
  params = read_released(path)
  validate(params, model_name, num_classes, source=path)
  return params


# ----------------------------------------------------------------------------------------------------------
# Flat .npz.


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def _write_npz(flat: Mapping[str, np.ndarray], f) -> None:
  # np.savez's own keyword names ('file', 'allow_pickle') could collide with keys, so write the zip here.
  with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
    for key, value in flat.items():
      with zf.open(key + '.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


def export_npz(params: Mapping[str, Mapping[str, Any]], path: PathLike) -> None:
  """Writes params as a plain .npz, one array per `module/param` key (see `flatten`); no pickles inside."""
  flat = flatten(params)
  _atomic_write(os.fspath(path), lambda f: _write_npz(flat, f))


def load_npz(path: PathLike, model_name: Optional[str] = None, num_classes: Optional[int] = None,
             check: bool = True) -> Params:
  """Reads a flat .npz from `export_npz`; `check=False` skips the comparison with the registry model."""
  path = os.fspath(path)
  _check_exists(path)
  params = _as_param_tree(_unflatten_file(_read_npz_flat(path), path), path)
  if check:
    validate(params, model_name, num_classes, source=path)
  return params


# ----------------------------------------------------------------------------------------------------------
# timm dm_nfnet_f*.

_TIMM_CONVS = {'conv0': 'conv1', 'conv1': 'conv2', 'conv1b': 'conv2b', 'conv2': 'conv3',
               'conv_shortcut': 'downsample.conv'}
_HAIKU_CONVS = {v: k for k, v in _TIMM_CONVS.items()}
_SE = {'linear': 'fc1', 'linear_1': 'fc2'}
_HAIKU_SE = {v: k for k, v in _SE.items()}


def _block_index(block: str) -> int:
  return int(_BLOCK.match(block).group(1) or 0)


def _block_name(k: int) -> str:
  return 'nf_block' if k == 0 else f'nf_block_{k}'


def _conv_to_timm(prefix: str, ps: Mapping[str, Any], out: Dict[str, np.ndarray], bad: List[str]) -> None:
  for name, x in ps.items():
    x = np.asarray(x)
    if name == 'w' and x.ndim == 4:
      out[f'{prefix}.weight'] = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    elif name == 'gain' and x.ndim == 1:
      out[f'{prefix}.gain'] = x.reshape(-1, 1, 1, 1).copy()
    elif name == 'bias' and x.ndim == 1:
      out[f'{prefix}.bias'] = x.copy()
    else:
      bad.append(f'{prefix}: {name} {x.shape}')


def _linear_to_timm(prefix: str, ps: Mapping[str, Any], out: Dict[str, np.ndarray], bad: List[str],
                    as_conv: bool) -> None:
  for name, x in ps.items():
    x = np.asarray(x)
    if name == 'w' and x.ndim == 2:
      w = np.ascontiguousarray(x.T)
      out[f'{prefix}.weight'] = w[:, :, None, None] if as_conv else w
    elif name == 'b' and x.ndim == 1:
      out[f'{prefix}.bias'] = x.copy()
    else:
      bad.append(f'{prefix}: {name} {x.shape}')


def to_timm(params: Mapping[str, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Haiku NFNet tree -> timm `dm_nfnet_f*` state dict of NumPy arrays (ecosystem.md §1.5 table).

  Stages are found from the tree: each stage starts with the block that owns a `conv_shortcut` (true of every
  NFNet, whose stage-1 block changes width and later stages stride). Load into timm with
  `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.

  Numerics: timm's `ScaledStdConv2dSame` adds eps=1e-5 to the per-unit variance where DeepMind floors
  `var * fan_in` at 1e-4, and timm uses exact GELU where DeepMind uses the tanh form, so timm's logits
  differ by ~3% of their size. To reproduce this model's logits in timm to ~1e-6, set `eps=1e-10` on every
  ScaledStdConv2dSame and make its activations `gelu_tanh` (the approximate GELU); with eps alone the
  difference is ~2e-4 (ecosystem.md §1.3).
  """
  out: Dict[str, np.ndarray] = {}
  bad: List[str] = []
  blocks = sorted((_block_index(m.split('/~/')[1]), m) for m in _block_modules(params))
  if [k for k, _ in blocks] != list(range(len(blocks))):
    raise CheckpointError(f'Block indices are not 0..{len(blocks) - 1}: {[m for _, m in blocks]}')
  stage_of: Dict[str, str] = {}
  s, b = -1, 0
  for _, module in blocks:
    if f'{module}/~/conv_shortcut' in params:
      s, b = s + 1, 0
    elif s < 0:
      raise CheckpointError(f'The first block {module!r} has no conv_shortcut, so stages cannot be inferred')
    stage_of[module.split('/~/')[1]] = f'stages.{s}.{b}'
    b += 1
  for module, ps in params.items():
    parts = module.split('/~/')
    if parts[0] != _ROOT:
      bad.append(module)
    elif len(parts) == 2 and re.fullmatch(r'stem_conv\d+', parts[1]):
      _conv_to_timm(f'stem.conv{int(parts[1][len("stem_conv"):]) + 1}', ps, out, bad)
    elif parts[1:] == ['final_conv']:
      _conv_to_timm('final_conv', ps, out, bad)
    elif parts[1:] == ['linear']:
      _linear_to_timm('head.fc', ps, out, bad, as_conv=False)
    elif len(parts) >= 2 and parts[1] in stage_of:
      prefix, rest = stage_of[parts[1]], parts[2:]
      if not rest:
        for name, x in ps.items():
          if name == 'skip_gain':
            out[f'{prefix}.skipinit_gain'] = np.array(x)
          else:
            bad.append(f'{module}/{name}')
      elif len(rest) == 1 and rest[0] in _TIMM_CONVS:
        _conv_to_timm(f'{prefix}.{_TIMM_CONVS[rest[0]]}', ps, out, bad)
      elif len(rest) == 2 and rest[0] == 'squeeze_excite' and rest[1] in _SE:
        _linear_to_timm(f'{prefix}.attn_last.{_SE[rest[1]]}', ps, out, bad, as_conv=True)
      else:
        bad.append(module)
    else:
      bad.append(module)
  if bad:
    raise CheckpointError('No timm name for these Haiku entries:\n  ' + '\n  '.join(sorted(bad)))
  return dict(sorted(out.items()))


_TIMM_KEY = re.compile(
    r'^(?:stem\.conv(?P<stem>\d+)'
    r'|stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?:(?P<conv>conv1|conv2|conv2b|conv3|downsample\.conv)'
    r'|attn_last\.(?P<se>fc1|fc2)|(?P<skip>skipinit_gain))'
    r'|(?P<final>final_conv)|(?P<head>head\.fc))'
    r'(?:\.(?P<param>weight|bias|gain))?$')


def _conv_from_timm(param: str, x: np.ndarray) -> Tuple[str, Optional[np.ndarray]]:
  if param == 'weight' and x.ndim == 4:
    return 'w', np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if param == 'gain' and x.ndim in (1, 4):
    return 'gain', x.reshape(-1).copy()
  if param == 'bias' and x.ndim == 1:
    return 'bias', x.copy()
  return param, None


def _linear_from_timm(param: str, x: np.ndarray) -> Tuple[str, Optional[np.ndarray]]:
  if param == 'weight' and (x.ndim == 2 or (x.ndim == 4 and x.shape[2:] == (1, 1))):
    return 'w', np.ascontiguousarray(x.reshape(x.shape[:2]).T)
  if param == 'bias' and x.ndim == 1:
    return 'b', x.copy()
  return param, None


def from_timm(state_dict: Mapping[str, Any]) -> Params:
  """timm `dm_nfnet_f*` state dict -> Haiku tree, without checking it against a model (see `load_timm`)."""
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  if sd and all(k.startswith('module.') for k in sd):  # saved from DataParallel
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  parsed, bad = [], []
  for key, x in sd.items():
    m = _TIMM_KEY.match(key)
    if m is None or (m['skip'] is None) == (m['param'] is None):
      bad.append(f'{key} (unknown name)')
    else:
      parsed.append((m, key, x))
  stage_blocks = collections.defaultdict(set)
  for m, _, _ in parsed:
    if m['s'] is not None:
      stage_blocks[int(m['s'])].add(int(m['b']))
  stages = sorted(stage_blocks)
  if stages != list(range(len(stages))) or any(
      sorted(stage_blocks[s]) != list(range(len(stage_blocks[s]))) for s in stages):
    raise CheckpointError(f'timm stages/blocks are not contiguous from 0: '
                          f'{ {s: sorted(bs) for s, bs in stage_blocks.items()} }')
  offsets = np.cumsum([0] + [len(stage_blocks[s]) for s in stages]).tolist()
  params: Params = {}
  for m, key, x in parsed:
    if m['stem'] is not None:
      module, convert = f'{_ROOT}/~/stem_conv{int(m["stem"]) - 1}', _conv_from_timm
    elif m['final']:
      module, convert = f'{_ROOT}/~/final_conv', _conv_from_timm
    elif m['head']:
      module, convert = f'{_ROOT}/~/linear', _linear_from_timm
    else:
      block = f'{_ROOT}/~/{_block_name(offsets[int(m["s"])] + int(m["b"]))}'
      if m['skip']:
        if x.size != 1:
          bad.append(f'{key} {x.shape} (expected a scalar)')
        params.setdefault(block, {})['skip_gain'] = x.reshape(()).copy()
        continue
      if m['conv']:
        module, convert = f'{block}/~/{_HAIKU_CONVS[m["conv"]]}', _conv_from_timm
      else:
        module, convert = f'{block}/~/squeeze_excite/~/{_HAIKU_SE[m["se"]]}', _linear_from_timm
    name, value = convert(m['param'], x)
    if value is None:
      bad.append(f'{key} {x.shape} (unexpected parameter or rank)')
    else:
      params.setdefault(module, {})[name] = value
  if bad:
    raise CheckpointError('Cannot map these timm entries to Haiku:\n  ' + '\n  '.join(sorted(bad)))
  return params


def _to_numpy(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, 'detach'):  # a torch tensor; NumPy has no bfloat16, so widen those
    t = x.detach().cpu()
    if str(t.dtype) == 'torch.bfloat16':
      t = t.float()
    return t.numpy()
  return np.asarray(x)


def _read_timm_file(path: str) -> Dict[str, Any]:
  _check_exists(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'Reading {path} needs the safetensors package: pip install safetensors') from None
    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError
      raise CheckpointError(f'{path}: truncated or corrupt .safetensors file ({e})') from e
  if suffix in ('.pth', '.pt', '.bin', '.ckpt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'Reading {path} needs PyTorch (pip install torch), or convert it to '
                        '.safetensors elsewhere') from None
    try:
      sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
      raise CheckpointError(f'{path}: cannot read as a PyTorch state dict ({e})') from e
    for wrapper in ('state_dict_ema', 'state_dict', 'model'):
      if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
        sd = sd[wrapper]
        break
    return dict(sd)
  if suffix == '.npz':
    return _read_npz_flat(path)
  raise CheckpointError(f'{path}: unknown timm weight format {suffix!r}; accepted: .safetensors, .pth, '
                        '.pt, .bin, .ckpt, .npz')


def load_timm(path_or_state_dict: Union[PathLike, Mapping[str, Any]], model_name: Optional[str] = None,
              num_classes: Optional[int] = None) -> Params:
  """Loads a timm `dm_nfnet_f*` state dict as a Haiku tree checked against a registry model.

  Args:
    path_or_state_dict: .safetensors (needs `safetensors`), .pth/.pt/.bin (needs torch), .npz from
      `save_timm`, or an in-memory dict of NumPy arrays or torch tensors.
    model_name: registry name ('F0') or timm name ('dm_nfnet_f0'); None detects it.
  See `to_timm` for how timm's numerics differ.
  """
  if isinstance(path_or_state_dict, Mapping):
    source, sd = 'timm state dict', path_or_state_dict
  else:
    source = os.fspath(path_or_state_dict)
    sd = _read_timm_file(source)
  params = from_timm(sd)
  validate(params, model_name, num_classes, source=source)
  return params


def save_timm(params: Mapping[str, Mapping[str, Any]], path: PathLike) -> str:
  """Writes `to_timm(params)`: .safetensors if the path says so or safetensors is installed, else .npz.

  A path with neither suffix gets one appended. Returns the path written.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  try:
    from safetensors.numpy import save as st_save  # pylint: disable=g-import-not-at-top
  except ImportError:
    st_save = None
  if suffix not in ('.safetensors', '.npz'):
    path += '.safetensors' if st_save else '.npz'
    suffix = os.path.splitext(path)[1]
  if suffix == '.safetensors' and st_save is None:
    raise ImportError(f'Writing {path} needs the safetensors package: pip install safetensors '
                      '(or write .npz)')
  sd = to_timm(params)
  if suffix == '.safetensors':
    blob = st_save({k: np.asarray(v, order="C") for k, v in sd.items()})
    _atomic_write(path, lambda f: f.write(blob))
  else:
    _atomic_write(path, lambda f: _write_npz(sd, f))
  return path


def _iter_leaves(params: Mapping[str, Mapping[str, Any]]) -> Iterable[np.ndarray]:
  for ps in params.values():
    yield from ps.values()


def count_params(params: Mapping[str, Mapping[str, Any]]) -> int:
  """Number of scalars in a tree (F0: 71,489,284)."""
  return int(sum(np.size(x) for x in _iter_leaves(params)))
