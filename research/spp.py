"""Signal-propagation plots (Brock et al. 2021a): per-block activation statistics of a model at init.

    python -m research.spp --model=F0 --out=docs/spp_f0.png [--input=gaussian|digits]
    python -m research.spp --config=configs/agc_study.py --out=runs/spp_agc_study.png   # a config's model

For each residual block, measured at the block's output over a batch: the average channel squared mean,
the average channel variance, and the variance of the residual branch (before alpha * skip_gain). Two
states are shown, because at the default init every skip gain is 0 and every non-transition block is the
identity (a flat variance curve that says little): the default init, and the same weights with every
skip gain set to 1 (how the network propagates once the residual branches are switched on). The dashed
line is the beta/alpha rule: a transition block (the first of a stage) outputs variance 1 + alpha^2, each
later block adds alpha^2.

Inputs: 'gaussian' is i.i.d. N(0, 1) per pixel, the usual SPP input. It is spatially white, so a stride-2
NFNet transition block, whose shortcut average-pools 2x2, passes less variance than the rule assumes.
'digits' is real (spatially correlated) images from the built-in digits data, resized and standardised
to zero mean and unit variance per channel over the batch.
"""
import os
from typing import Dict, Mapping, Optional, Sequence, Union

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import nfnets
from nfnets import registry

METRICS = ('avg_sq_mean', 'avg_var', 'res_avg_var')
INPUTS = ('gaussian', 'digits')


def model_config(model: Union[str, Mapping], num_classes: Optional[int] = None) -> Mapping:
  """A config's `model` block (what `nfnets.registry.model_from_config` reads) for a registry name or a
  model block; `num_classes` replaces the block's."""
  block = {'name': model} if isinstance(model, str) else dict(model)
  if num_classes is not None:
    block['num_classes'] = num_classes
  return block


def block_plan(model: Union[str, Mapping], **overrides):
  """Every block's plan (stage, beta, expected output variance, ...) of a registry name or a config's model
  block, with constructor overrides: the plan the model itself is built from."""
  return registry.plan_from_config(model_config(model), **overrides).blocks


def transitions(blocks) -> np.ndarray:
  """True for each block that starts a stage (stride or width change: its shortcut is a conv)."""
  return np.array([b.stage_index == 0 for b in blocks])


def expected_variance(blocks) -> np.ndarray:
  """The beta/alpha rule for each block's output variance (unit-variance residual branches, gains 1)."""
  return np.array([b.expected_out_var for b in blocks])


def gaussian_images(batch: int, resolution: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, resolution, resolution, 3), jnp.float32)


def digits_images(batch: int, resolution: int, seed: int = 0) -> jax.Array:
  """Real digits images (train split), bilinearly resized, standardised per channel over the batch."""
  from nfnets.data import sources  # pylint: disable=g-import-not-at-top
  images, _ = sources.digits_arrays()['train']
  idx = np.random.RandomState(seed).choice(len(images), batch, replace=False)
  x = jnp.asarray(images[idx], jnp.float32)
  x = jax.image.resize(x, (batch, resolution, resolution, 3), 'bilinear')
  return (x - x.mean(axis=(0, 1, 2))) / (x.std(axis=(0, 1, 2)) + 1e-6)


def make_images(kind: str, batch: int, resolution: int, seed: int = 0) -> jax.Array:
  if kind == 'gaussian':
    return gaussian_images(batch, resolution, seed)
  if kind == 'digits':
    return digits_images(batch, resolution, seed)
  raise ValueError(f'Unknown SPP input {kind!r}; accepted: {INPUTS}')


def _set_skip_gains(params, value: float):
  return hk.data_structures.map(
      lambda m, n, p: jnp.full_like(p, value) if n == 'skip_gain' else p, params)


def measure(model: Union[str, Mapping], images: jax.Array, skip_gains: Sequence[Optional[float]] = (None, 1.0),
            seed: int = 0, num_classes: Optional[int] = None, **overrides) -> Dict[str, Dict[str, np.ndarray]]:
  """Per-block SPP statistics at init, in eval mode (no stochastic depth), of a registry name or a config's
  model block (`config.model`: its width, depths, skip_gain_init, ... are honoured).

  Args:
    images: an NHWC float batch (see `make_images`).
    skip_gains: the states to measure: None is the default init (skip gains 0), a number sets every
      skip gain to it on the same initial weights.
    overrides: constructor overrides, e.g. depths=(1, 2, 6, 3), widths=..., group_width=...
  Returns:
    {state label: {'avg_sq_mean', 'avg_var', 'res_avg_var': [num_blocks] arrays}}.
  """
  block = model_config(model, num_classes)
  nfnets.get_spec(block['name'])  # a clear error for an unknown name
  if images.ndim != 4:
    raise ValueError(f'images must be NHWC, got shape {images.shape}')
  f = hk.transform(lambda x: registry.model_from_config(block, **overrides)(
      x, is_training=False, return_metrics=True))
  params = jax.jit(f.init)(jax.random.PRNGKey(seed), images)
  apply = jax.jit(f.apply)
  out = {}
  for gain in skip_gains:
    p = params if gain is None else _set_skip_gains(params, gain)
    _, metrics = apply(p, None, images)
    label = 'default init (skip gain 0)' if gain is None else f'skip gain {gain:g}'
    out[label] = {k: np.asarray(metrics[k]) for k in METRICS}
  return out


def plot(path: str, results: Dict[str, Dict[str, np.ndarray]], blocks, title: str = '') -> Dict[str, dict]:
  """Three panels (squared mean, variance, residual variance) vs block, one line per state, the rule on
  the variance panel. Returns what each panel drew: {metric: {line label: y values}}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  starts = np.flatnonzero(transitions(blocks))
  drawn = {}
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
  names = {'avg_sq_mean': 'average channel squared mean', 'avg_var': 'average channel variance',
           'res_avg_var': 'residual-branch variance'}
  for ax, k in zip(axes, METRICS):
    for label, m in results.items():
      ax.plot(np.arange(len(m[k])), m[k], marker='o', markersize=3, label=label)
    if k == 'avg_var':
      ax.plot(expected_variance(blocks), 'k--', lw=1, label='β/α rule (gains 1)')
    drawn[k] = {line.get_label(): np.asarray(line.get_ydata()) for line in ax.get_lines()}
    for s in starts[1:]:
      ax.axvline(s - 0.5, color='gray', lw=0.6, ls=':')
    ax.set_title(names[k], fontsize=10)
    ax.set_xlabel('block (dotted: stage transitions)')
    if k == 'avg_sq_mean':
      ax.set_ylim(bottom=0)
    else:  # stride-2 average pooling of white noise divides by ~4 per stage: a log scale shows both
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return drawn


def spp(model: Union[str, Mapping], out: str, input_kind: str = 'gaussian', batch: int = 8,
        resolution: Optional[int] = None, seed: int = 0, **overrides) -> Dict[str, Dict[str, np.ndarray]]:
  """Measures a registry name or a config's model block at init on `input_kind`; writes the plot to `out`."""
  name = model_config(model)['name']
  resolution = resolution or nfnets.get_spec(name).train_size
  images = make_images(input_kind, batch, resolution, seed)
  results = measure(model, images, seed=seed, **overrides)
  blocks = block_plan(model, **overrides)
  plot(out, results, blocks,
       title=f'{name} at init, {input_kind} input, batch {batch} at {resolution} px (α={blocks[0].alpha:g})')
  return results


def define_flags():
  """The command-line flags (defined only when run as a program, so imports do not clash)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from nfnets import run_config  # pylint: disable=g-import-not-at-top
  global _MODEL, _CONFIG, _OUT, _INPUT, _BATCH, _RES, _SEED
  _MODEL = flags.DEFINE_string('model', 'F0', 'Registry model name: F0..F7(+), nf_resnet50, nfnet_tiny, ...')
  _CONFIG = run_config.define_config_flag(base.get_config, "A config (recipe .py or a run's config.json) "
                                          'whose model to plot, width and depths included; replaces --model.')
  _OUT = flags.DEFINE_string('out', os.path.join('runs', 'spp.png'), 'Output PNG.')
  _INPUT = flags.DEFINE_enum('input', 'gaussian', list(INPUTS), 'Input batch: i.i.d. Gaussian or digits.')
  _BATCH = flags.DEFINE_integer('batch', 8, 'Batch size of the input.')
  _RES = flags.DEFINE_integer('resolution', None, "Image size (default: the model's train size).")
  _SEED = flags.DEFINE_integer('seed', 0, 'Init and input seed.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  model = _CONFIG.value.model if _CONFIG.value is not None else _MODEL.value
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  results = spp(model, _OUT.value, _INPUT.value, _BATCH.value, _RES.value, _SEED.value)
  np.set_printoptions(precision=3, suppress=True, linewidth=150)
  for label, m in results.items():
    print(label)
    for k in METRICS:
      print(f'  {k:12s} {m[k]}')
  print(f'wrote {os.path.abspath(_OUT.value)}')
  return 0


def parse_flags(argv):
  from configs import base  # pylint: disable=g-import-not-at-top
  from nfnets import run_config  # pylint: disable=g-import-not-at-top
  return run_config.parse_flags(argv, base.get_config, require_config=False)


if __name__ == '__main__':
  from nfnets import console  # pylint: disable=g-import-not-at-top
  define_flags()
  console.run(main, (ValueError,), flags_parser=parse_flags)
