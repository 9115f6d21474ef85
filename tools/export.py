"""Exports an NFNet's inference function with `jax.export`: one file that any JAX program can run.

  python -m tools.export --workdir=runs/demo                       # writes runs/demo/export/model.jaxexport
  python -m tools.export --init_from=F0_haiku.npz --model=F0 --out=runs/f0.jaxexport --savedmodel=runs/f0_sm

Writes `<out>` (the serialised `jax.export.Exported`, the params baked in as constants) and `<out>.json`
(model name, num_classes, image_size, resize_pad, the normalisation constants, class names or null).
Without --out: `<workdir>/export/model.jaxexport`, else `runs/export/<weights name>.jaxexport`.

A run's workdir supplies its config.json: the exported model is the one the config describes
(`nfnets.registry.model_from_config`, width and depths overrides included), at the run's eval size.

The exported function takes float32 images [B, S, S, 3], RGB in 0..255, already resized and cropped as the
eval pipeline does (bicubic resize of the whole image to S + resize_pad, centre crop S: the reference code's
`eval_preproc='resize_crop_32'`, deepmind-research/nfnets experiment_nfnets.py); B is symbolic (any batch
size), S is the run's eval size, else the model's test size. Inside, it normalises with the ImageNet mean and
std with `nfnets.data.normalize.normalize` ((x - 255 * mean) / (255 * std), float32), the function the train
and eval steps and tools.predict use, and returns the float32 logits [B, num_classes]. Grouped convs use
XLA's native convolution, lowered for --platforms.

Reading it needs only JAX (no code from this repository):

  import jax, numpy as np
  with open('digits.jaxexport', 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  logits = exported.call(np.zeros((2, 32, 32, 3), np.float32))

--savedmodel=DIR also writes a TensorFlow SavedModel of the same function through
`jax.experimental.jax2tf` (present in jax 0.10.2; needs TensorFlow); its `serving_default` signature maps
`images` to `logits`.

Class names: --classes=FILE (one per line), else the run's dataset (digits: '0'..'9'; an image folder: its
class folders; a TFDS dataset: its label names; imagenet2012: the ILSVRC-2012 names), else the ImageNet names
for a 1000-class model, else null.

Refused with `error: ...` and exit code 2 (nothing written): an existing --out or `<out>.json` without
--overwrite, an existing --savedmodel folder (never overwritten), weights that do not fit --model or
--num_classes, an --image_size other than the eval size recorded in the run's config.json. A full or
read-only disk: one `error:` line, exit code 74 (`nfnets.console`), no partial file left.
"""
import json
import os
import sys
from typing import List, Optional

from nfnets import console

PLATFORMS = ('cpu', 'cuda', 'tpu')


class ExportError(ValueError):
  """A user error: printed as one line `error: ...`, exit code 2."""


def define_flags():
  """Flags exist only when run as a script, so tests can import this module next to other absl programs."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  global _WORKDIR, _INIT_FROM, _MODEL, _NUM_CLASSES, _OUT, _OVERWRITE, _SAVEDMODEL, _IMAGE_SIZE, _CLASSES
  global _PLATFORMS
  _WORKDIR = flags.DEFINE_string('workdir', None, "A run's workdir: its latest EMA params and config.json.")
  _INIT_FROM = flags.DEFINE_string('init_from', None, 'Weights: a workdir, released pickle, flat .npz or '
                                   'timm file.')
  _MODEL = flags.DEFINE_string('model', None, "Registry name; default: the run's, else detected.")
  _NUM_CLASSES = flags.DEFINE_integer('num_classes', None, "Default: the weights' classifier width.")
  _OUT = flags.DEFINE_string('out', None, 'The .jaxexport file to write (and <out>.json).')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out and <out>.json.')
  _SAVEDMODEL = flags.DEFINE_string('savedmodel', None, 'Also write a TF SavedModel (jax2tf) to this new '
                                    'folder.')
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', None, "Input size S; default: the run's eval size, else "
                                     "the model's test size.", lower_bound=1)
  _CLASSES = flags.DEFINE_string('classes', None, 'Class names, one per line in label order.')
  _PLATFORMS = flags.DEFINE_list('platforms', list(PLATFORMS), 'Platforms to lower for.')


def one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- inputs

def check_outputs(out: str, savedmodel: Optional[str], overwrite: bool) -> None:
  """Raises ExportError before any work if an output exists (and may not be replaced) or cannot be made."""
  if not out:
    raise ExportError('--out is required (the .jaxexport file to write)')
  for path in (out, out + '.json'):
    if os.path.isdir(path):
      raise ExportError(f'--out: {path} is a folder')
    if os.path.exists(path) and not overwrite:
      raise ExportError(f'--out: {path} exists; pass --overwrite to replace it')
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise ExportError(f'--out: folder {parent} does not exist')
  if savedmodel is not None:
    if os.path.exists(savedmodel):
      raise ExportError(f'--savedmodel: {savedmodel} exists; give a new folder (it is never overwritten)')
    if not os.path.isdir(os.path.dirname(os.path.abspath(savedmodel))):
      raise ExportError(f'--savedmodel: folder {os.path.dirname(os.path.abspath(savedmodel))} does not exist')


def load(weights: str, model: Optional[str] = None, num_classes: Optional[int] = None,
         image_size: Optional[int] = None):
  """`tools.predict.Predictor` for `weights` (the model its run's config describes, num_classes, params,
  image_size, resize_pad), with a one-line ExportError when the weights do not fit --model/--num_classes
  or the run's resolution."""
  from nfnets import run_config, weights as weights_lib  # pylint: disable=g-import-not-at-top
  from tools import predict  # pylint: disable=g-import-not-at-top
  if not os.path.exists(weights):
    raise ExportError(f'no such file or folder: {weights}')
  try:
    p = predict.Predictor(weights, model, num_classes, image_size=image_size, conv_impl='xla')
  except weights_lib.WeightsError as e:
    raise ExportError(f'{one_line(e)} (the weights do not fit --model/--num_classes)') from None
  recorded = p.config.dataset.get('eval_image_size') if p.config is not None else None
  if image_size is not None and recorded and image_size != recorded:
    raise ExportError(f'--image_size={image_size} does not fit {weights}: the run evaluates at {recorded} px '
                      f'({run_config.CONFIG_JSON} dataset.eval_image_size); leave --image_size out')
  return p


def class_names(p, classes_file: Optional[str] = None) -> Optional[List[str]]:
  """Names in label order for a loaded `Predictor` (see the module docstring), or None when unknown."""
  from nfnets import class_names as names_lib  # pylint: disable=g-import-not-at-top
  return names_lib.class_names(p.num_classes, classes_file, p.config.dataset if p.config is not None else None)


# ---------------------------------------------------------------------------------------------------- export

def normalisation():
  """(mean, std) on the 0..255 scale: the constants of `nfnets.data.normalize.normalize`."""
  from nfnets.data import normalize  # pylint: disable=g-import-not-at-top
  return tuple(normalize.MEAN_RGB), tuple(normalize.STDDEV_RGB)


def inference_fn(model_config, params):
  """images float32 [B, S, S, 3] in 0..255 -> float32 logits of the model a config's `model` block
  describes; normalisation and params inside, XLA's convolution for every platform."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  from nfnets.data.normalize import normalize  # pylint: disable=g-import-not-at-top
  net = hk.without_apply_rng(hk.transform(
      lambda x: registry.model_from_config(model_config, conv_impl='xla')(x, is_training=False)))
  consts = jax.tree.map(np.asarray, params)

  def fn(images):
    # XLA would fold the baked-in weights' standardisation at compile time (another rounding than
    # tools.predict's program, whose params are arguments); the barrier keeps it computed at run time.
    return net.apply(jax.lax.optimization_barrier(consts), normalize(images)).astype(jnp.float32)
  return fn


def export(fn, image_size: int, platforms=PLATFORMS):
  """`jax.export.Exported` of fn with input float32 [b, S, S, 3], b symbolic."""
  import jax  # pylint: disable=g-import-not-at-top
  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jax.numpy.float32)
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def metadata(p, names, platforms, source: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  mean, std = normalisation()
  s = p.image_size
  return {
      'format': 'jax.export', 'jax_version': jax.__version__, 'platforms': list(platforms),
      'model': p.model, 'num_classes': p.num_classes, 'weights': source,
      'model_config': dict(p.model_config),   # the config's model block it was built from (width, depths...)
      'image_size': s, 'resize_pad': p.resize_pad,
      'input': f'float32 [B, {s}, {s}, 3], RGB 0..255, bicubic resize of the whole image to '
               f'{s + p.resize_pad}x{s + p.resize_pad} then centre crop {s}x{s}; not normalised',
      'normalization': {'mean_rgb': list(mean), 'stddev_rgb': list(std), 'inside_function': True,
                        'formula': '(images - mean_rgb) / stddev_rgb'},
      'output': f'float32 logits [B, {p.num_classes}]',
      'class_names': names,
  }


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `path` whole or not at all (a full disk leaves the old file, and no temporary one)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_savedmodel(fn, image_size: int, directory: str, platforms=PLATFORMS) -> None:
  """TF SavedModel of fn via jax2tf (native serialisation, symbolic batch), written to a new folder."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'--savedmodel needs TensorFlow, which is not importable ({one_line(e)})') from None
  try:
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    import jax  # pylint: disable=g-import-not-at-top
    raise ExportError(f'--savedmodel: jax.experimental.jax2tf is not available in jax {jax.__version__} '
                      f'({one_line(e)}); use the .jaxexport file') from None
  s = image_size
  converted = jax2tf.convert(fn, polymorphic_shapes=[f'(b, {s}, {s}, 3)'], with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.predict = tf.function(lambda images: {'logits': converted(images)}, autograph=False,
                               input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32, name='images')])
  tmp = f'{os.path.normpath(directory)}.tmp-{os.getpid()}'
  tf.saved_model.save(module, tmp, signatures={'serving_default': module.predict})
  os.replace(tmp, directory)


def run(weights: str, out: str, model: Optional[str] = None, num_classes: Optional[int] = None,
        image_size: Optional[int] = None, overwrite: bool = False, savedmodel: Optional[str] = None,
        classes_file: Optional[str] = None, platforms=PLATFORMS, log=sys.stdout) -> dict:
  """The command: checks outputs, loads, exports, writes; returns the metadata written."""
  check_outputs(out, savedmodel, overwrite)
  bad = sorted(set(platforms) - set(PLATFORMS))
  if bad or not platforms:
    raise ExportError(f'--platforms: {",".join(bad) or "none given"}; accepted: {",".join(PLATFORMS)}')
  p = load(weights, model, num_classes, image_size)
  names = class_names(p, classes_file)
  fn = inference_fn(p.model_config, p.params)
  exported = export(fn, p.image_size, platforms)
  meta = metadata(p, names, platforms, weights)
  if savedmodel is not None:  # first: the step that can still fail leaves --out untouched
    write_savedmodel(fn, p.image_size, savedmodel, platforms)
    print(f'wrote TF SavedModel {savedmodel}', file=log)
  _atomic_write(out + '.json', (json.dumps(meta, indent=2) + '\n').encode())
  _atomic_write(out, bytes(exported.serialize()))
  print(f'wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) and {out}.json: {p.model}, {p.num_classes} '
        f'classes, input float32 [B, {p.image_size}, {p.image_size}, 3] 0..255, platforms '
        f'{",".join(platforms)}', file=log)
  return meta


def default_out(workdir: Optional[str], init_from: Optional[str]) -> str:
  """Where --out goes when it is not given: into the run (`<workdir>/export/model.jaxexport`), else under
  runs/ (`runs/export/<weights file name>.jaxexport`), both out of git's way."""
  if workdir:
    return os.path.join(workdir, 'export', 'model.jaxexport')
  stem = os.path.splitext(os.path.basename(os.path.normpath(init_from)))[0]
  return os.path.join('runs', 'export', f'{stem}.jaxexport')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_WORKDIR.value) == bool(_INIT_FROM.value):
    raise ExportError('give exactly one of --workdir and --init_from')
  if _WORKDIR.value and not os.path.isdir(_WORKDIR.value):
    raise ExportError(f'--workdir: {_WORKDIR.value} is not a folder')
  out = _OUT.value
  if not out:
    out = default_out(_WORKDIR.value, _INIT_FROM.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
  run(_WORKDIR.value or _INIT_FROM.value, out, _MODEL.value, _NUM_CLASSES.value, _IMAGE_SIZE.value,
      _OVERWRITE.value, _SAVEDMODEL.value, _CLASSES.value, _PLATFORMS.value)
  return 0


def cli():
  """The `nfnets-export` command (pyproject.toml); `python -m tools.export` runs the same."""
  define_flags()
  # WeightsError and ConfigError are ValueErrors.
  console.run(main, (ExportError, FileNotFoundError, ValueError, ImportError))


if __name__ == '__main__':
  cli()
