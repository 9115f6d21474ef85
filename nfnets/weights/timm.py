"""timm `dm_nfnet_f*` state dicts <-> the Haiku tree (timm's port of the released weights).

Names and layouts follow timm's NFNet (timm/models/nfnet.py, its `ScaledStdConv2dSame` convs in
timm/layers/std_conv.py):

  Haiku                                     timm
  NFNet/~/stem_conv{i}         w (H,W,I,O)  stem.conv{i+1}.weight (O,I,H,W), gain (O,1,1,1), bias
  NFNet/~/nf_block_k/~/conv0 .. conv2       stages.s.b.conv1 .. conv3 (conv1b -> conv2b)
  NFNet/~/nf_block_k/~/conv_shortcut        stages.s.b.downsample.conv
  .../squeeze_excite/~/linear{,_1} w (I,O)  stages.s.b.attn_last.fc{1,2}.weight (O,I,1,1)
  NFNet/~/nf_block_k skip_gain ()           stages.s.b.skipinit_gain
  NFNet/~/final_conv                        final_conv
  NFNet/~/linear               w (I,O)      head.fc.weight (O,I)

Block k of the Haiku tree is block b of stage s of timm's; stages are found from the tree, each starting
with the block that owns a `conv_shortcut`.

Numerics: timm's `ScaledStdConv2dSame` adds eps=1e-5 to the per-unit variance where the reference code
(deepmind-research/nfnets) floors `var * fan_in` at 1e-4, and timm uses exact GELU where the reference code
uses the tanh form, so timm's logits from the same weights differ from this model's. Setting `eps=1e-10` on
every ScaledStdConv2dSame and making timm's activations `gelu_tanh` leaves only float32 rounding.

`.safetensors` needs the `safetensors` package and `.pth/.pt/.bin/.ckpt` need torch; both stay optional and
are imported only when such a file is read or written.
"""
import collections
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from nfnets.weights import npz
from nfnets.weights import validation
from nfnets.weights.tree import ROOT, Params, PathLike, WeightsError
from nfnets.weights.tree import block_index, block_modules, block_name, check_exists, SEP

_TIMM_CONVS = {'conv0': 'conv1', 'conv1': 'conv2', 'conv1b': 'conv2b', 'conv2': 'conv3',
               'conv_shortcut': 'downsample.conv'}
_HAIKU_CONVS = {v: k for k, v in _TIMM_CONVS.items()}
_SE = {'linear': 'fc1', 'linear_1': 'fc2'}
_HAIKU_SE = {v: k for k, v in _SE.items()}
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
SUFFIXES = ('.safetensors',) + TORCH_SUFFIXES  # read as timm state dicts by `read_timm_file`


def looks_like_timm(flat: Mapping[str, Any]) -> bool:
  """True for a flat dict named like a timm state dict ('stem.conv1.weight'): no Haiku '/' keys."""
  return bool(flat) and not any(SEP in k for k in flat) and any(k.startswith('stem.') for k in flat)


# ----------------------------------------------------------------------------------------------------------
# Haiku -> timm.


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


def _stage_names(params: Mapping[str, Any]) -> Dict[str, str]:
  """'nf_block_k' -> 'stages.s.b'; a stage starts at each block that owns a conv_shortcut."""
  blocks = sorted((block_index(m.split('/~/')[1]), m) for m in block_modules(params))
  if [k for k, _ in blocks] != list(range(len(blocks))):
    raise WeightsError(f'Block indices are not 0..{len(blocks) - 1}: {[m for _, m in blocks]}')
  stage_of: Dict[str, str] = {}
  s, b = -1, 0
  for _, module in blocks:
    if f'{module}/~/conv_shortcut' in params:
      s, b = s + 1, 0
    elif s < 0:
      raise WeightsError(f'The first block {module!r} has no conv_shortcut, so stages cannot be inferred')
    stage_of[module.split('/~/')[1]] = f'stages.{s}.{b}'
    b += 1
  return stage_of


def to_timm(params: Mapping[str, Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  """Haiku NFNet tree -> timm `dm_nfnet_f*` state dict of NumPy arrays (see the module docstring's table).

  Load into timm with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`; see the
  module docstring for how timm's numerics differ.
  """
  out: Dict[str, np.ndarray] = {}
  bad: List[str] = []
  stage_of = _stage_names(params)
  for module, ps in params.items():
    parts = module.split('/~/')
    if parts[0] != ROOT:
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
    raise WeightsError('No timm name for these Haiku entries:\n  ' + '\n  '.join(sorted(bad)))
  return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# timm -> Haiku.

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


def _to_numpy(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, 'detach'):  # a torch tensor; NumPy has no bfloat16, so widen those
    t = x.detach().cpu()
    if str(t.dtype) == 'torch.bfloat16':
      t = t.float()
    return t.numpy()
  return np.asarray(x)


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
    raise WeightsError(f'timm stages/blocks are not contiguous from 0: '
                       f'{ {s: sorted(bs) for s, bs in stage_blocks.items()} }')
  offsets = np.cumsum([0] + [len(stage_blocks[s]) for s in stages]).tolist()
  params: Params = {}
  for m, key, x in parsed:
    if m['stem'] is not None:
      module, convert = f'{ROOT}/~/stem_conv{int(m["stem"]) - 1}', _conv_from_timm
    elif m['final']:
      module, convert = f'{ROOT}/~/final_conv', _conv_from_timm
    elif m['head']:
      module, convert = f'{ROOT}/~/linear', _linear_from_timm
    else:
      block = f'{ROOT}/~/{block_name(offsets[int(m["s"])] + int(m["b"]))}'
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
    raise WeightsError('Cannot map these timm entries to Haiku:\n  ' + '\n  '.join(sorted(bad)))
  return params


# ----------------------------------------------------------------------------------------------------------
# Files.


def read_timm_file(path: str) -> Dict[str, Any]:
  """The state dict in a .safetensors, .pth/.pt/.bin/.ckpt or .npz file, unconverted."""
  check_exists(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top  (optional package)
    except ImportError:
      raise ImportError(f'Reading {path} needs the safetensors package: pip install safetensors') from None
    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError
      raise WeightsError(f'{path}: truncated or corrupt .safetensors file ({e})') from e
  if suffix in TORCH_SUFFIXES:
    try:
      import torch  # pylint: disable=g-import-not-at-top  (optional package)
    except ImportError:
      raise ImportError(f'Reading {path} needs PyTorch (pip install torch), or convert it to '
                        '.safetensors elsewhere') from None
    try:
      sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
      raise WeightsError(f'{path}: cannot read as a PyTorch state dict ({e})') from e
    for wrapper in ('state_dict_ema', 'state_dict', 'model'):
      if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
        sd = sd[wrapper]
        break
    return dict(sd)
  if suffix == '.npz':
    return npz.read_flat(path)
  raise WeightsError(f'{path}: unknown timm weight format {suffix!r}; accepted: .safetensors, .pth, '
                     '.pt, .bin, .ckpt, .npz')


def load_timm(path_or_state_dict: Union[PathLike, Mapping[str, Any]], model_name: Optional[str] = None,
              num_classes: Optional[int] = None) -> Params:
  """Loads a timm `dm_nfnet_f*` state dict as a Haiku tree checked against a registry model.

  Args:
    path_or_state_dict: .safetensors (needs `safetensors`), .pth/.pt/.bin (needs torch), .npz from
      `save_timm`, or an in-memory dict of NumPy arrays or torch tensors.
    model_name: registry name ('F0') or timm name ('dm_nfnet_f0'); None detects it.
  See the module docstring for how timm's numerics differ.
  """
  if isinstance(path_or_state_dict, Mapping):
    source, sd = 'timm state dict', path_or_state_dict
  else:
    source = os.fspath(path_or_state_dict)
    sd = read_timm_file(source)
  params = from_timm(sd)
  validation.validate(params, model_name, num_classes, source=source)
  return params


def save_timm(params: Mapping[str, Mapping[str, Any]], path: PathLike) -> str:
  """Writes `to_timm(params)`: .safetensors if the path says so or safetensors is installed, else .npz.

  A path with neither suffix gets one appended. Returns the path written.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  try:
    from safetensors.numpy import save as st_save  # pylint: disable=g-import-not-at-top  (optional package)
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
    blob = st_save({k: np.asarray(v, order='C') for k, v in sd.items()})
    npz.atomic_write(path, lambda f: f.write(blob))
  else:
    npz.atomic_write(path, lambda f: npz.write_flat(sd, f))
  return path
