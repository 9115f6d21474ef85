"""A restricted unpickler for DeepMind's released weights: it rebuilds dicts and numeric arrays, nothing else.

The released `F0_haiku.npz` .. `F6_haiku.npz` (reference code, deepmind-research/nfnets) are, despite the
name, dill pickles of the parameter tree, possibly wrapped in Haiku's 2021 `FlatMapping`. A pickle may name
any importable callable, so `find_class` here hands out only the stand-ins in `ALLOWED_PICKLE_GLOBALS`:
a tampered file cannot run code. Nothing of Haiku, dill or jax is imported to rebuild their objects.
"""
import _compat_pickle
import collections
import os
import pickle
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np

from nfnets.weights.tree import WeightsError

try:
  from numpy._core.multiarray import _reconstruct as _np_reconstruct_impl
  from numpy._core.multiarray import scalar as _np_scalar_impl
  from numpy._core.numeric import _frombuffer as _np_frombuffer_impl
except ImportError:  # NumPy 1.x
  from numpy.core.multiarray import _reconstruct as _np_reconstruct_impl  # type: ignore
  from numpy.core.multiarray import scalar as _np_scalar_impl  # type: ignore
  from numpy.core.numeric import _frombuffer as _np_frombuffer_impl  # type: ignore


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
  """A pickle that asks for something other than dicts and numeric arrays."""


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


def load(path: str) -> Any:
  """The object pickled in `path`, rebuilt by the restricted unpickler.

  Raises:
    UnsafePickleError: the pickle names a global outside `ALLOWED_PICKLE_GLOBALS` (nothing of it runs).
    WeightsError: a truncated or corrupt pickle. Both messages name the file.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    try:
      return _RestrictedUnpickler(f).load()
    except WeightsError as e:
      raise type(e)(f'{e} (file: {path})') from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, UnicodeDecodeError) as e:
      raise WeightsError(f'{path}: truncated or corrupt weights file, not a complete pickle of '
                         f'parameter arrays ({type(e).__name__}: {e})') from e
