"""Linear probe: how well a frozen NFNet's pooled features separate a dataset's classes.

  python -m tools.linear_probe --workdir=runs/demo                                  # the run's own data
  python -m tools.linear_probe --workdir=runs/demo --shots=1,5,10 --seeds=3
  python -m tools.linear_probe --workdir=runs/demo --config.dataset.name=folder --config.dataset.data_dir=DIR
  python -m tools.linear_probe --config=configs/demo.py --init_from=F0_haiku.npz    # weights without a run

A run's workdir supplies its saved config (config.json: the model it describes, width and depths included,
and its dataset) and its latest EMA params; `--config.dataset.*` overrides probe other data with the same
features. Without a run, --config names the dataset and --init_from the weights (the model is detected from
the parameter shapes; --model overrides). The dataset block gives the name, splits, data_dir, eval size and
resize pad.

Features: the `pre_logits` vector (the globally pooled final-conv activations the classifier reads) of every
image of the train and eval splits, at config.dataset.eval_image_size (else the registry's test size) with
the eval preprocessing only (`nfnets.data.eval_iterator`: resize to S + pad, centre crop; then the
ImageNet mean/std of `nfnets.data.normalize` inside the jitted model call; no augmentation).

Classifier: ridge regression on one-hot targets, solved in closed form (an unpenalised intercept; the
regulariser alpha = c * trace(Xc^T Xc) / d, so the grid of c is independent of the features' scale and of
the number of examples). Why ridge rather than logistic regression: the solution is exact and deterministic
(no learning rate, epochs or convergence test to tune), one eigendecomposition of the d x d Gram matrix gives
the fit for every c of the grid, it takes seconds even for d = 3072 (F0-F7), and it can be checked against
any independent solver (tests compare it with scikit-learn's Ridge). c is chosen on a stratified held-out
20% of the train split (the largest c of the best held-out top-1), then the classifier is refitted on all
of train and scored on the eval split. The NFNet paper transfers by fine-tuning (Brock et al. 2021,
Sec. 6.2: JFT-300M pre-training, then ImageNet); a linear probe is the cheap check of the frozen features.

--shots=k1,k2 also fits on k train examples per class (sampled without replacement, one sample per seed,
--seeds of them) with the c chosen above and reports the mean and spread of their eval top-1.

The last line printed (stdout) is `linear probe top1 <x>`; progress goes to stderr as the project's INFO
lines. Errors in the inputs (an empty split, more shots than the smallest class has, unreadable weights)
print `error: ...` and exit 2 (`nfnets.console`).
"""
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nfnets import console

REG_GRID = tuple(10.0 ** e for e in range(-6, 3))   # relative regulariser c (see the module docstring)
HOLDOUT_FRACTION = 0.2


class ProbeError(ValueError):
  """A user error: printed as one line `error: ...`, exit code 2."""


def define_flags():
  """Flags exist only when run as a script, so tests can import this module next to other absl programs."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from nfnets import run_config  # pylint: disable=g-import-not-at-top
  global _CONFIG, _WORKDIR, _INIT_FROM, _MODEL, _SHOTS, _SEEDS, _BATCH_SIZE, _HOLDOUT, _CONV_IMPL
  _CONFIG = run_config.define_config_flag(base.get_config, "Config naming the dataset (a recipe .py or a "
                                          "run's config.json); default: --workdir's saved config.")
  _WORKDIR = flags.DEFINE_string('workdir', None, "A run: its saved config and latest EMA params.")
  _INIT_FROM = flags.DEFINE_string('init_from', None, 'Weights: a run workdir (its EMA params) or a weights '
                                   'file; default: --workdir.')
  _MODEL = flags.DEFINE_string('model', None, "Registry name; default: the run's, else detected.")
  _SHOTS = flags.DEFINE_list('shots', [], 'Also report k-shot top-1 for these k (examples per class).')
  _SEEDS = flags.DEFINE_integer('seeds', 3, 'Samples (seeds) averaged per k-shot value.', lower_bound=1)
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Images per forward pass.', lower_bound=1)
  _HOLDOUT = flags.DEFINE_float('holdout', HOLDOUT_FRACTION, 'Part of train held out to choose the '
                                'regulariser.', lower_bound=0.01, upper_bound=0.9)
  _CONV_IMPL = flags.DEFINE_string('conv_impl', None, "Conv lowering (nfnets.conv.IMPLS); default: the "
                                   "run's, else 'auto'.")


# ---------------------------------------------------------------------------------------------------- features

def feature_fn(model_config, conv_impl: Optional[str] = None):
  """jitted (params, eval crops [B, S, S, 3] in 0..255) -> float32 pre_logits [B, C] of the model a config's
  `model` block describes (`nfnets.registry.model_from_config`); normalises inside."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  from nfnets.data.normalize import normalize  # pylint: disable=g-import-not-at-top
  net = hk.without_apply_rng(hk.transform(lambda x: registry.model_from_config(model_config, conv_impl=conv_impl)(
      x, is_training=False, return_features=True)[1]['pre_logits']))
  return jax.jit(lambda p, x: net.apply(p, normalize(x)).astype('float32'))


def split_name(ds_config, which: str) -> str:
  return f"{ds_config.name} '{ds_config.train_split if which == 'train' else ds_config.eval_split}'"


def check_split(ds_config, which: str) -> int:
  """The number of examples of the train or eval split. Raises ProbeError for 'fake' data or a split with
  no examples."""
  from nfnets.data import sources  # pylint: disable=g-import-not-at-top
  if which not in ('train', 'eval'):
    raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
  if ds_config.name == 'fake':
    raise ProbeError("dataset 'fake' has random images and labels: nothing to probe; use a config with real data")
  source = sources.get_source(ds_config)
  count = source.num_train if which == 'train' else source.num_eval
  if count == 0:
    raise ProbeError(f'the {which} split ({split_name(ds_config, which)}) is empty: 0 examples')
  return count


def batches(ds_config, which: str, image_size: int, batch_size: int) -> Tuple[int, Iterator[dict]]:
  """(number of examples listed, iterator of {'images' (0..255, not normalised), 'labels', 'mask'} numpy
  batches of `batch_size`, the last one padded (mask 0)): the split in order, eval preprocessing
  (`nfnets.data.eval_iterator`); undecodable images are masked out and reported in a warning."""
  from nfnets import data  # pylint: disable=g-import-not-at-top
  total = check_split(ds_config, which)
  return total, data.eval_iterator(ds_config, global_batch_size=batch_size, image_size=image_size,
                                   process_index=0, process_count=1, split=which)


def extract_features(params, model_config, ds_config, which: str, image_size: int, batch_size: int = 256,
                     fn=None, log: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """float32 pre_logits [N, C] and int labels [N] of a split ('train' or 'eval') through the model
  `model_config` describes (`feature_fn`; or `fn`), with progress INFO lines (images done / total,
  images/s) at most every 2 s when `log`."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  fn = fn or feature_fn(model_config)
  total, it = batches(ds_config, which, image_size, batch_size)
  feats, labels, done, t0, shown = [], [], 0, time.time(), 0.0
  for b in it:   # every batch has batch_size images: one compiled shape
    keep = b['mask'] > 0
    feats.append(np.asarray(fn(params, b['images']))[keep])
    labels.append(b['labels'][keep])
    done += int(keep.sum())
    now = time.time()
    if log and (now - shown >= 2 or done >= total):
      shown = now
      logging.info('features %s: %d/%d images, %.1f images/s', split_name(ds_config, which), done, total,
                   done / max(now - t0, 1e-9))
  if not done:
    raise ProbeError(f'the {which} split ({split_name(ds_config, which)}) is empty: none of its {total} '
                     'images could be read')
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- ridge

def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float64)[labels]


def relative_alpha(x: np.ndarray, c: float) -> float:
  """alpha = c * trace(Xc^T Xc) / d (Xc: x centred): c times the mean eigenvalue of the Gram matrix."""
  xc = np.asarray(x, np.float64) - np.mean(x, axis=0, dtype=np.float64)
  return float(c * np.sum(xc * xc) / x.shape[1])


def ridge_path(x: np.ndarray, labels: np.ndarray, num_classes: int,
               alphas: Sequence[float]) -> List[Tuple[np.ndarray, np.ndarray]]:
  """[(W [d, K], b [K])] minimising ||Xc W - Yc||^2 + alpha ||W||^2 for each alpha (Y one-hot, intercept
  unpenalised: b = mean(Y) - mean(X) W), from one eigendecomposition of Xc^T Xc, in float64."""
  x = np.asarray(x, np.float64)
  y = one_hot(labels, num_classes)
  mu, ybar = x.mean(axis=0), y.mean(axis=0)
  xc = x - mu
  s, v = np.linalg.eigh(xc.T @ xc)
  s = np.maximum(s, 0.0)
  p = v.T @ (xc.T @ (y - ybar))
  out = []
  for alpha in alphas:
    if not alpha > 0:
      raise ValueError(f'ridge alpha must be > 0, got {alpha}')
    w = v @ (p / (s + alpha)[:, None])
    out.append((w, ybar - mu @ w))
  return out


def ridge_fit(x, labels, num_classes: int, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
  """One alpha of `ridge_path` by a direct solve: of the d x d primal system, or of the n x n dual one
  (W = Xc^T (Xc Xc^T + alpha I)^-1 Yc, the same W) when there are fewer examples than features."""
  if not alpha > 0:
    raise ValueError(f'ridge alpha must be > 0, got {alpha}')
  x = np.asarray(x, np.float64)
  y = one_hot(labels, num_classes)
  mu, ybar = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - mu, y - ybar
  n, d = xc.shape
  if n < d:
    w = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(n), yc)
  else:
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ yc)
  return w, ybar - mu @ w


def predict(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
  return np.argmax(np.asarray(x, np.float64) @ w + b, axis=1)


def top1(w, b, x, labels) -> float:
  return float(np.mean(predict(w, b, x) == labels))


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(fit indices, held-out indices): round(fraction * n_c) of each class c held out, at least 1 when the
  class has 2 or more examples, never all of it."""
  rng = np.random.RandomState(seed)
  fit, held = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    k = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
    held.append(idx[:k])
    fit.append(idx[k:])
  return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def choose_regulariser(x, labels, num_classes: int, grid: Sequence[float] = REG_GRID,
                       fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> Tuple[float, Dict[float, float]]:
  """(chosen c, {c: held-out top-1}): fit on (1 - fraction) of train, score on the rest; ties go to the
  largest c (the most regularised)."""
  fit, held = stratified_holdout(labels, fraction, seed)
  if not len(held) or not len(fit):
    raise ProbeError(f'the train split has {len(labels)} examples: too few to hold out {fraction:.0%} to '
                     'choose the regulariser')
  base = relative_alpha(x[fit], 1.0)
  path = ridge_path(x[fit], labels[fit], num_classes, [c * base for c in grid])
  scores = {c: top1(w, b, x[held], labels[held]) for c, (w, b) in zip(grid, path)}
  best = max(scores.values())
  return max(c for c, s in scores.items() if s == best), scores


# ---------------------------------------------------------------------------------------------------- few-shot

def check_shots(shots: Sequence[int], labels: np.ndarray, num_classes: int) -> None:
  counts = np.bincount(labels, minlength=num_classes)
  present = np.flatnonzero(counts)
  smallest = int(present[np.argmin(counts[present])]) if len(present) else 0
  limit = int(counts[smallest]) if len(present) else 0
  for k in shots:
    if k < 1:
      raise ProbeError(f'--shots={k}: every k must be >= 1')
    if k > limit:
      raise ProbeError(f'--shots={k} is more than the smallest train class has: class {smallest} has '
                       f'{limit} examples, so k <= {limit}')


def few_shot_indices(labels: np.ndarray, k: int, seed: int, num_classes: int) -> np.ndarray:
  """Indices of k examples of every class present in `labels`, sampled without replacement."""
  check_shots([k], labels, num_classes)
  rng = np.random.RandomState(seed)
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                 for c in np.unique(labels)]))


def few_shot(train_x, train_y, test_x, test_y, num_classes: int, shots: Sequence[int], seeds: int,
             c: float) -> Dict[int, List[float]]:
  """{k: [test top-1 of each seed]}: ridge with relative regulariser c on k examples per class."""
  check_shots(shots, train_y, num_classes)
  out = {}
  for k in shots:
    accs = []
    for seed in range(seeds):
      idx = few_shot_indices(train_y, k, seed, num_classes)
      w, b = ridge_fit(train_x[idx], train_y[idx], num_classes, relative_alpha(train_x[idx], c))
      accs.append(top1(w, b, test_x, test_y))
    out[k] = accs
  return out


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, shots: Sequence[int] = (),
                 seeds: int = 3, fraction: float = HOLDOUT_FRACTION, grid: Sequence[float] = REG_GRID) -> dict:
  """Chooses c on a held-out part of train, refits on all of train; the eval top-1 and k-shot results."""
  for name, y in (('train', train_y), ('eval', test_y)):
    if not len(y):
      raise ProbeError(f'the {name} split is empty: 0 examples')
  check_shots(shots, train_y, num_classes)  # before any fitting
  c, scores = choose_regulariser(train_x, train_y, num_classes, grid, fraction)
  alpha = relative_alpha(train_x, c)
  w, b = ridge_fit(train_x, train_y, num_classes, alpha)
  return {'c': c, 'alpha': alpha, 'holdout_top1': scores, 'w': w, 'b': b,
          'top1': top1(w, b, test_x, test_y),
          'shots': few_shot(train_x, train_y, test_x, test_y, num_classes, shots, seeds, c)}


# ---------------------------------------------------------------------------------------------------- CLI

def parse_shots(values: Sequence[str]) -> List[int]:
  out = []
  for v in values:
    try:
      out.append(int(v))
    except ValueError:
      raise ProbeError(f'--shots: {v!r} is not an integer') from None
    if out[-1] < 1:
      raise ProbeError(f'--shots={out[-1]}: every k must be >= 1')
  return out


def run(config, init_from: str, model: Optional[str] = None, shots: Sequence[int] = (), seeds: int = 3,
        batch_size: int = 256, fraction: float = HOLDOUT_FRACTION, conv_impl: Optional[str] = None,
        out=sys.stdout) -> dict:
  """The command: loads the weights, extracts both splits' features, fits and prints; returns the results.
  `config` names the dataset; the model is `init_from`'s (its run's config.json, else detected)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from nfnets.data import dataset_info  # pylint: disable=g-import-not-at-top
  from tools import predict  # pylint: disable=g-import-not-at-top
  ds = config.dataset
  for which in ('train', 'eval'):
    check_split(ds, which)  # an empty split fails before the (slow) weight loading
  num_classes = dataset_info(ds).num_classes
  if not os.path.exists(init_from):
    raise FileNotFoundError(f'--init_from: no such file or folder: {init_from}')
  loaded = predict.Predictor(init_from, model=model, conv_impl=conv_impl)
  size = ds.get('eval_image_size') or registry_test_size(loaded.model)
  from nfnets.data import preprocess  # pylint: disable=g-import-not-at-top
  logging.info('%s from %s: pre_logits at %d px (resize pad %d), %s with %d classes', loaded.model, init_from,
               size, preprocess.eval_resize_pad(size, ds.eval_resize_pad), ds.name, num_classes)
  fn = feature_fn(loaded.model_config)
  t0 = time.time()
  kw = dict(image_size=size, batch_size=batch_size, fn=fn)
  train_x, train_y = extract_features(loaded.params, loaded.model_config, ds, 'train', **kw)
  check_shots(shots, train_y, num_classes)
  test_x, test_y = extract_features(loaded.params, loaded.model_config, ds, 'eval', **kw)
  t1 = time.time()
  res = linear_probe(train_x, train_y, test_x, test_y, num_classes, shots, seeds, fraction)
  logging.info('features: train %s, eval %s in %.1f s; ridge fits in %.1f s', train_x.shape, test_x.shape,
               t1 - t0, time.time() - t1)
  print('held-out top1 by regulariser c: ' + ', '.join(
      f'{c:g}: {s:.4f}' for c, s in res['holdout_top1'].items()) + f'; chosen c={res["c"]:g} '
      f'(alpha={res["alpha"]:.4g})', file=out)
  for k, accs in res['shots'].items():
    print(f'{k}-shot top1 {np.mean(accs):.4f} +- {np.std(accs):.4f} over {len(accs)} seeds', file=out)
  print(f'linear probe top1 {res["top1"]:.4f}', file=out, flush=True)
  return res


def registry_test_size(model: str) -> int:
  from nfnets import registry  # pylint: disable=g-import-not-at-top
  return registry.get_spec(model).test_size


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise ProbeError('give --workdir of a run, or --config (a config naming the dataset, e.g. '
                     'configs/demo.py) with --init_from')
  init_from = _INIT_FROM.value or _WORKDIR.value
  if not init_from:
    raise ProbeError('--init_from is required without --workdir (a run workdir or a weights file)')
  run(_CONFIG.value, init_from, _MODEL.value, parse_shots(_SHOTS.value), _SEEDS.value, _BATCH_SIZE.value,
      _HOLDOUT.value, _CONV_IMPL.value)
  return 0


def parse_flags(argv):
  """--workdir's saved config is the config (`nfnets.run_config`); --config is needed only without one."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from nfnets import run_config  # pylint: disable=g-import-not-at-top
  return run_config.parse_flags(argv, base.get_config, require_config=False)


def cli():
  """The `nfnets-linear-probe` command (pyproject.toml); `python -m tools.linear_probe` runs the same."""
  define_flags()
  # WeightsError and ConfigError are ValueErrors.
  console.run(main, (ProbeError, FileNotFoundError, ValueError, ImportError), flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
