"""Classifies image files with NFNet weights: top-k class names and probabilities per image.

  python -m tools.predict --weights=runs/demo runs/samples/digit_*.png      # a run's workdir (its EMA params)
  python -m tools.predict --weights=F0_haiku.npz cat.jpg dog.png           # DeepMind's released F0 weights
  python -m tools.predict --weights=f0_flat.npz --top=3 --json a.jpg        # JSON on stdout

Weights: a run's workdir or checkpoint folder (the latest EMA params), DeepMind's released pickle
(`F*_haiku.npz`), a flat .npz from `python -m tools.export_weights`, or a timm `dm_nfnet_f*` state dict
(.safetensors; .pth needs PyTorch). A run's workdir supplies its saved config.json: the model is the one its
config describes (`nfnets.registry.model_from_config`: width and depths overrides included), with its eval
size, resize pad and class names. Other weights: the model is detected from the parameter shapes unless
--model is given. --model/--num_classes that do not fit the weights are an error that lists every mismatch.

Preprocessing is the eval pipeline's (`nfnets.data.preprocess.eval_image`; the reference code's
`eval_preproc='resize_crop_32'`, deepmind-research/nfnets experiment_nfnets.py): the whole image is
resized (bicubic, aspect ratio not kept) to the test size + 32 and centre-cropped to the test size; the
model call normalises it with the ImageNet mean/std (`nfnets.data.normalize`). A run's workdir supplies its
own eval size and padding. JPEG, PNG, GIF and BMP are decoded by TensorFlow, other formats (WebP, TIFF, ...)
through Pillow; grayscale and RGBA images become RGB.

Class names (`nfnets.class_names`): --classes=FILE (one per line in label order; a `synset<TAB>name` line
shows the name), else the run's dataset (an image folder: its class folders; digits: '0'..'9'; a TFDS
dataset: its label names), else the ILSVRC-2012 names for a 1000-class model, else indices.

Console: the predictions on stdout; the project's INFO line and warnings on stderr. Exit status 0; 1 when
--skip_bad_images skipped some; 2 with one `error:` line per problem for bad input (missing or unreadable
images or weights, a --model or --num_classes that does not fit); 74 when the storage fails.
"""
import json
import os
import re
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from nfnets import console
from nfnets.class_names import IMAGENET_CLASSES, read_class_names  # pylint: disable=unused-import


def define_flags():
  """Defines this script's flags; called only when run as a script, so importing predict (tests, other
  tools) never collides with another absl program's flags such as benchmarks.bench's --batch_size."""
  from nfnets import conv as conv_lib  # pylint: disable=g-import-not-at-top
  global _WEIGHTS, _MODEL, _NUM_CLASSES, _TOP, _CLASSES, _IMAGE_SIZE, _RESIZE_PAD, _BATCH_SIZE, _JSON, _SKIP_BAD, _CONV_IMPL
  _WEIGHTS = flags.DEFINE_string('weights', None, 'Run workdir, released pickle, flat .npz or timm file.')
  _MODEL = flags.DEFINE_string('model', None, "Registry name ('F0', 'F3+', 'nfnet_tiny', 'dm_nfnet_f1'); "
                               'detected from the weights when omitted.')
  _NUM_CLASSES = flags.DEFINE_integer('num_classes', None, "Taken from the weights' classifier when omitted.")
  _TOP = flags.DEFINE_integer('top', 5, 'How many classes to print per image.', lower_bound=1)
  _CLASSES = flags.DEFINE_string('classes', None, "Class names, one per line in label order (default: the "
                                 "run's dataset's, the ImageNet names for a 1000-class model, else indices).")
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', None, "Crop size; default: the run's eval size, else the "
                                     "model's test size.", lower_bound=1)
  _RESIZE_PAD = flags.DEFINE_integer('resize_pad', None, "Resize to image_size + resize_pad before the centre "
                                     "crop; default: the run's eval_resize_pad, else the eval pipeline's "
                                     "(32 at 256 px and above, scaled down with the size below).",
                                     lower_bound=0)
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Images per forward pass.', lower_bound=1)
  _JSON = flags.DEFINE_bool('json', False, 'Print a JSON list instead of text.')
  _SKIP_BAD = flags.DEFINE_bool('skip_bad_images', False, 'Warn about unreadable images and classify the '
                                'rest (default: report them all and stop).')
  _CONV_IMPL = flags.DEFINE_enum('conv_impl', None, list(conv_lib.IMPLS), "Conv lowering; default: the "
                                 "run's model.conv_impl, else 'auto'.")


class ImageError(ValueError):
  """Image files that are missing or cannot be decoded: `problems` has one line per file."""

  def __init__(self, problems):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__('\n'.join(self.problems))


# ---------------------------------------------------------------------------------------------------- model

class Predictor:
  """An NFNet with loaded weights and its eval preprocessing settings.

  Args:
    weights: anything `nfnets.init_weights.read_weights` reads (workdir, released pickle, .npz, timm file). A
      run's workdir supplies its config.json: the model its `model` block describes (width, depths, ...:
      `nfnets.registry.model_from_config`) and its eval size and resize pad.
    model: registry or timm name; None: the run's, else detected from the weights.
    num_classes: None: the run's, else the classifier's width in the weights.
    image_size / resize_pad: None: the run's eval settings, else the model's test size and the eval
      pipeline's pad for that size (`nfnets.data.preprocess.eval_resize_pad`).
    conv_impl: None: the run's (else 'auto'); tools.export lowers with 'xla'.
  Raises:
    FileNotFoundError for missing weights; `nfnets.weights.WeightsError` (a ValueError) for corrupt
    files or weights that do not fit the model; ConfigError for an unreadable config.json.
  """

  def __init__(self, weights: str, model: Optional[str] = None, num_classes: Optional[int] = None,
               image_size: Optional[int] = None, resize_pad: Optional[int] = None,
               conv_impl: Optional[str] = None):
    import haiku as hk  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from configs import base  # pylint: disable=g-import-not-at-top
    from nfnets import init_weights, registry, run_config  # pylint: disable=g-import-not-at-top
    from nfnets import weights as weights_lib  # pylint: disable=g-import-not-at-top
    from nfnets.data.normalize import normalize  # pylint: disable=g-import-not-at-top
    weights = os.fspath(weights)
    if not os.path.exists(weights):
      raise FileNotFoundError(f'--weights: no such file or folder: {weights}')
    saved = run_config.saved_config_path(weights)
    self.config = run_config.config_from_json(saved, base.get_config) if saved else None
    params = init_weights.read_weights(weights)
    if self.config is not None and model in (None, self.config.model.name):
      model_config = self.config.model.to_dict()   # the run's model, its width and depths included
      if num_classes is not None:
        model_config['num_classes'] = num_classes
      weights_lib.validate_config(params, model_config, source=weights)
    else:
      if model is None:  # detect with the file's own class count, so a wrong --num_classes lists mismatches
        model = weights_lib.validate(params, None, None, source=weights)
      model = weights_lib.validate(params, model, num_classes, source=weights)
      model_config = {'name': model, 'num_classes': weights_lib.num_classes(params) if num_classes is None
                      else num_classes}
    if conv_impl is not None:
      model_config['conv_impl'] = conv_impl
    self.model_config = model_config
    self.model, self.num_classes = model_config['name'], model_config['num_classes']
    ds = self.config.dataset if self.config is not None else {}
    self.image_size = image_size or ds.get('eval_image_size') or registry.get_spec(self.model).test_size
    from nfnets.data import preprocess  # pylint: disable=g-import-not-at-top (loads TensorFlow)
    pad = resize_pad if resize_pad is not None else ds.get('eval_resize_pad')
    # The eval pipeline's rule when neither says: 32 at S >= 256, scaled down with S below.
    self.resize_pad = preprocess.eval_resize_pad(self.image_size, None if pad is None else int(pad))
    self.weights = weights
    self.params = params
    net = hk.without_apply_rng(hk.transform(
        lambda x: registry.model_from_config(model_config)(x, is_training=False)))
    logits = lambda p, x: net.apply(p, normalize(x)).astype('float32')
    self._probs = jax.jit(lambda p, x: jax.nn.softmax(logits(p, x), axis=-1))
    self._logits = jax.jit(logits)

  def logits(self, images):
    """float32 logits [N, num_classes] for eval crops [N, S, S, 3] in 0..255 (`load_images`; normalised
    inside, as the exported function of tools.export)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    return np.asarray(self._logits(self.params, images))

  def probabilities(self, images):
    """Class probabilities [N, num_classes] for eval crops [N, S, S, 3] in 0..255."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    return np.asarray(self._probs(self.params, images))


# ---------------------------------------------------------------------------------------------------- images

def _decode_bytes(data: bytes, path: str):
  """Encoded bytes TF can decode (JPEG/PNG/GIF/BMP as they are, anything Pillow reads re-encoded as PNG)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
    return data
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as tf_error:
    import io  # pylint: disable=g-import-not-at-top
    try:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        out = io.BytesIO()
        im.convert('RGB').save(out, format='PNG')
      return out.getvalue()
    except Exception:  # pylint: disable=broad-except
      # TF's message reads '{{function_node ...}} Invalid PNG. ... [Op:DecodeImage]': keep the middle.
      why = re.sub(r'\{\{.*?\}\}|\[Op:\w+\]', '', str(tf_error)).strip().splitlines()
      raise ImageError(f'{path}: not a readable image ({len(data)} bytes; '
                       f'{why[0] if why else type(tf_error).__name__})') from None


def load_images(paths: Sequence[str], image_size: int, resize_pad: int, skip_bad: bool = False):
  """float32 [N, S, S, 3] crops of `paths` in 0..255 (eval preprocessing, not normalised) and the paths kept.

  Raises ImageError naming every missing or undecodable file, unless `skip_bad`, which warns and drops them.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from nfnets.data import preprocess  # pylint: disable=g-import-not-at-top
  images, kept, problems = [], [], []
  for path in paths:
    try:
      with open(path, 'rb') as f:
        data = f.read()
      if not data:
        raise ImageError(f'{path}: empty file')
      encoded = _decode_bytes(data, path)
      images.append(preprocess.eval_image(tf.constant(encoded), encoded=True, image_size=image_size,
                                          resize_pad=resize_pad).numpy())
      kept.append(path)
    except FileNotFoundError:
      problems.append(f'{path}: no such file')
    except IsADirectoryError:
      problems.append(f'{path}: is a folder, not an image file')
    except PermissionError:
      problems.append(f'{path}: permission denied')
    except ImageError as e:
      problems.append(str(e))
  if problems and not skip_bad:
    raise ImageError(problems)
  for p in problems:
    logging.warning('Skipping %s', p)
  shape = (0, image_size, image_size, 3)
  return (np.stack(images).astype(np.float32) if images else np.zeros(shape, np.float32)), kept


# ---------------------------------------------------------------------------------------------------- predict

def predict(predictor: Predictor, paths: Sequence[str], top: int = 5, class_names: Optional[List[str]] = None,
            batch_size: int = 16, skip_bad: bool = False) -> List[Dict]:
  """[{'image': path, 'top': [{'index', 'label', 'probability'}, ...]}] with probabilities descending."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  images, kept = load_images(paths, predictor.image_size, predictor.resize_pad, skip_bad)
  k = min(top, predictor.num_classes)
  bs = max(1, min(batch_size, len(kept)))
  results = []
  for start in range(0, len(kept), bs):
    chunk = images[start:start + bs]
    n = len(chunk)
    if n < bs:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
    probs = predictor.probabilities(chunk)[:n]
    for path, p in zip(kept[start:start + n], probs):
      order = np.argsort(-p, kind='stable')[:k]
      results.append({'image': path, 'top': [
          {'index': int(i), 'label': class_names[i] if class_names else str(int(i)),
           'probability': float(p[i])} for i in order]})
  return results


def format_text(results: List[Dict]) -> str:
  lines = []
  for r in results:
    lines.append(r['image'])
    for rank, t in enumerate(r['top'], 1):
      label = t['label'] if t['label'] == str(t['index']) else f"{t['label']} ({t['index']})"
      lines.append(f"  {rank}. {t['probability']:.4f}  {label}")
  return '\n'.join(lines)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files: python -m tools.predict --weights=PATH IMAGE [IMAGE ...]')
  if not _WEIGHTS.value:
    raise app.UsageError('--weights is required')
  missing = [p for p in paths if not os.path.exists(p)]
  if missing and not _SKIP_BAD.value:  # fail before the (slow) weight loading
    raise ImageError([f'{p}: no such file' for p in missing])
  from nfnets import class_names  # pylint: disable=g-import-not-at-top
  predictor = Predictor(_WEIGHTS.value, _MODEL.value, _NUM_CLASSES.value, _IMAGE_SIZE.value, _RESIZE_PAD.value,
                        _CONV_IMPL.value)
  dataset = predictor.config.dataset if predictor.config is not None else None
  names = class_names.class_names(predictor.num_classes, _CLASSES.value, dataset)
  logging.info('%s (%d classes) from %s; images resized to %d px, centre crop %d px', predictor.model,
               predictor.num_classes, predictor.weights, predictor.image_size + predictor.resize_pad,
               predictor.image_size)
  results = predict(predictor, paths, _TOP.value, names, _BATCH_SIZE.value, _SKIP_BAD.value)
  print(json.dumps(results, indent=2) if _JSON.value else format_text(results))
  return 0 if len(results) == len(paths) else 1


def user_errors():
  """The exceptions that are the user's input, not a bug: one `error:` line each, exit status 2."""
  from nfnets import config_validation, weights  # pylint: disable=g-import-not-at-top
  return (ImageError, weights.WeightsError, config_validation.ConfigError, FileNotFoundError, ValueError,
          ImportError)


def cli():
  """The `nfnets-predict` command (pyproject.toml); `python -m tools.predict` runs the same."""
  define_flags()
  console.run(main, user_errors())


if __name__ == '__main__':
  cli()
