"""Classifies image files with NFNet weights: top-k class names and probabilities per image.

  python -m tools.predict --weights=F0_haiku.npz cat.jpg dog.png           # DeepMind's released F0 weights
  python -m tools.predict --weights=runs/demo --classes=digits.txt *.png    # a run's workdir (its EMA params)
  python -m tools.predict --weights=f0_flat.npz --top=3 --json a.jpg        # JSON on stdout

Weights: a run's workdir or checkpoint folder (the latest EMA params), DeepMind's released pickle
(`F*_haiku.npz`), a flat .npz from `python -m tools.export_weights`, or a timm `dm_nfnet_f*` state dict
(.safetensors; .pth needs PyTorch). The model is detected from the parameter shapes unless --model is given
(a run's workdir names it in its config.json); --model/--num_classes that do not fit the weights are an
error that lists every mismatch.

Preprocessing is the eval pipeline's (`nfnets.data.preprocess.eval_image`; the reference code's
`eval_preproc='resize_crop_32'`, deepmind-research/nfnets experiment_nfnets.py): the whole image is
resized (bicubic, aspect ratio not kept) to the test size + 32 and centre-cropped to the test size; the
model call normalises it with the ImageNet mean/std (`nfnets.data.normalize`). A run's workdir supplies its
own eval size and padding. JPEG, PNG, GIF and BMP are decoded by TensorFlow, other formats (WebP, TIFF, ...)
through Pillow; grayscale and RGBA images become RGB.

Class names: a 1000-class model gets the ILSVRC-2012 names shipped in nfnets/imagenet_classes.txt
(`synset<TAB>name` per line, in the standard index order); --classes=FILE gives names for any model, one per
line in label order (a `synset<TAB>name` line shows the name). Without names, classes print as indices.
"""
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/.. holds the nfnets package
IMAGENET_CLASSES = os.path.join(_REPO, 'nfnets', 'imagenet_classes.txt')
EVAL_RESIZE_PAD = 32   # reference eval_preproc 'resize_crop_32': resize to S + 32, centre crop S


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
  _CLASSES = flags.DEFINE_string('classes', None, 'Class names, one per line in label order (default: the '
                                 'ImageNet names for a 1000-class model, else indices).')
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', None, "Crop size; default: the run's eval size, else the "
                                     "model's test size.", lower_bound=1)
  _RESIZE_PAD = flags.DEFINE_integer('resize_pad', None, "Resize to image_size + resize_pad before the centre "
                                     "crop; default: the run's eval_resize_pad, else 32.", lower_bound=0)
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Images per forward pass.', lower_bound=1)
  _JSON = flags.DEFINE_bool('json', False, 'Print a JSON list instead of text.')
  _SKIP_BAD = flags.DEFINE_bool('skip_bad_images', False, 'Warn about unreadable images and classify the '
                                'rest (default: report them all and stop).')
  _CONV_IMPL = flags.DEFINE_enum('conv_impl', 'auto', list(conv_lib.IMPLS), 'Grouped-conv lowering.')


class ImageError(ValueError):
  """Image files that are missing or cannot be decoded; the message lists every one."""


# ---------------------------------------------------------------------------------------------------- model

def _run_config(weights: str) -> dict:
  """config.json of a run whose workdir (or checkpoints folder) is `weights`; {} otherwise."""
  if not os.path.isdir(weights):
    return {}
  for folder in (weights, os.path.dirname(os.path.normpath(weights))):
    path = os.path.join(folder, 'config.json')
    if os.path.isfile(path):
      try:
        with open(path) as f:
          return json.load(f)
      except (OSError, ValueError):
        return {}
  return {}


class Predictor:
  """An NFNet with loaded weights and its eval preprocessing settings.

  Args:
    weights: anything `nfnets.run_dir.read_weights` reads (workdir, released pickle, .npz, timm file).
    model: registry or timm name; None: the run's config.json, else detected from the weights.
    num_classes: None: the classifier's width in the weights.
    image_size / resize_pad: None: the run's eval settings, else the model's test size and 32.
  Raises:
    FileNotFoundError for missing weights; `nfnets.weights.WeightsError` (a ValueError) for corrupt
    files or weights that do not fit the model.
  """

  def __init__(self, weights: str, model: Optional[str] = None, num_classes: Optional[int] = None,
               image_size: Optional[int] = None, resize_pad: Optional[int] = None, conv_impl: str = 'auto'):
    import haiku as hk  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from nfnets import registry, run_dir  # pylint: disable=g-import-not-at-top
    from nfnets import weights as weights_lib  # pylint: disable=g-import-not-at-top
    weights = os.fspath(weights)
    if not os.path.exists(weights):
      raise FileNotFoundError(f'--weights: no such file or folder: {weights}')
    run = _run_config(weights)
    params = run_dir.read_weights(weights)
    model = model or run.get('model', {}).get('name')
    if model is None:  # detect with the file's own class count, so a wrong --num_classes lists mismatches
      model = weights_lib.validate(params, None, None, source=weights)
    self.model = weights_lib.validate(params, model, num_classes, source=weights)
    self.num_classes = weights_lib.num_classes(params) if num_classes is None else num_classes
    spec = registry.get_spec(self.model)
    ds = run.get('dataset', {})
    self.image_size = image_size or ds.get('eval_image_size') or spec.test_size
    pad = resize_pad if resize_pad is not None else ds.get('eval_resize_pad')
    self.resize_pad = EVAL_RESIZE_PAD if pad is None else int(pad)
    self.weights = weights
    self.params = params
    name, n = self.model, self.num_classes
    net = hk.without_apply_rng(hk.transform(
        lambda x: registry.create_model(name, n, conv_impl=conv_impl)(x, is_training=False)))
    from nfnets.data.normalize import normalize  # pylint: disable=g-import-not-at-top
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
    raise ImageError(f'{len(problems)} of {len(paths)} images cannot be read:\n  ' + '\n  '.join(problems))
  for p in problems:
    print(f'warning: skipping {p}', file=sys.stderr)
  shape = (0, image_size, image_size, 3)
  return (np.stack(images).astype(np.float32) if images else np.zeros(shape, np.float32)), kept


# ---------------------------------------------------------------------------------------------------- classes

def read_class_names(path: Optional[str], num_classes: int) -> Optional[List[str]]:
  """Names for `num_classes` labels: from `path`, the shipped ImageNet list for 1000 classes, else None."""
  if path is None:
    if num_classes != 1000:
      return None
    path = IMAGENET_CLASSES
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\r\n') for line in f]
  except OSError as e:
    raise FileNotFoundError(f'--classes: cannot read {path}: {e.strerror or e}') from None
  while lines and not lines[-1].strip():
    lines.pop()
  names = [line.split('\t', 1)[-1].strip() for line in lines]
  if len(names) != num_classes:
    raise ValueError(f'{path} has {len(names)} class names but the model has {num_classes} classes')
  return names


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
  logging.set_verbosity(logging.ERROR)  # orbax logs every restore, and warns about read-only use
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files: python -m tools.predict --weights=PATH IMAGE [IMAGE ...]')
  if not _WEIGHTS.value:
    raise app.UsageError('--weights is required')
  from nfnets import weights as weights_lib  # pylint: disable=g-import-not-at-top
  try:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and not _SKIP_BAD.value:  # fail before the (slow) weight loading
      raise ImageError(f'{len(missing)} of {len(paths)} images cannot be read:\n  '
                       + '\n  '.join(f'{p}: no such file' for p in missing))
    predictor = Predictor(_WEIGHTS.value, _MODEL.value, _NUM_CLASSES.value, _IMAGE_SIZE.value,
                          _RESIZE_PAD.value, _CONV_IMPL.value)
    names = read_class_names(_CLASSES.value, predictor.num_classes)
    print(f'{predictor.model} ({predictor.num_classes} classes) from {predictor.weights}; images resized to '
          f'{predictor.image_size + predictor.resize_pad} px, centre crop {predictor.image_size} px',
          file=sys.stderr)
    results = predict(predictor, paths, _TOP.value, names, _BATCH_SIZE.value, _SKIP_BAD.value)
  except (ImageError, weights_lib.WeightsError, FileNotFoundError, ValueError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(results, indent=2) if _JSON.value else format_text(results))
  return 0 if len(results) == len(paths) else 1


if __name__ == '__main__':
  define_flags()
  app.run(main)
