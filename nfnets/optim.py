"""The optimizer: AGC in front of SGD-Nesterov with coupled weight decay (the paper's), AdamW or LAMB, and
the warmup-cosine LR schedule.

Parameter groups (which params get weight decay, which AGC clips) come from `nfnets.param_groups`.
"""
import math
from typing import Callable

from absl import logging
import jax.numpy as jnp
import optax

from nfnets.agc import agc
from nfnets.param_groups import agc_mask, weight_decay_mask

REFERENCE_BATCH = 256  # LR = base_lr * batch / 256


def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: float,
                           min_lr: float = 0.0) -> Callable:
  """Linear warmup 0 -> peak over `warmup_steps` (a float, as the reference), then cosine to `min_lr`.

  At 0-based step t: t*peak/warmup while t <= warmup, else
  min + 0.5*(peak-min)*(1 + cos(pi*(t-warmup)/(total-warmup))). optax's warmup_cosine_decay_schedule
  takes an integer warmup, which shifts every value of the reference's fractional-warmup schedule.
  """
  if total_steps < 1 or warmup_steps < 0:
    raise ValueError(f'Need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}')

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak_lr * t / max(warmup_steps, 1e-12)
    progress = (t - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    cos = min_lr + 0.5 * (peak_lr - min_lr) * (1 + jnp.cos(math.pi * progress))
    return jnp.where(t <= warmup_steps, warm, cos)

  return schedule


def make_schedule(opt_config, batch_size: int, training_steps: int, num_train_examples: int) -> Callable:
  """The LR schedule from a config: peak = base_lr * batch/256 (if scale_by_batch), warmup in epochs."""
  peak = opt_config.base_lr * (batch_size / REFERENCE_BATCH if opt_config.scale_by_batch else 1.0)
  warmup_steps = opt_config.warmup_epochs * num_train_examples / batch_size
  if training_steps <= warmup_steps:
    logging.warning(
        'training_steps=%d ends inside the LR warmup (optimizer.warmup_epochs=%g of %d examples at '
        'batch_size=%d is %.1f steps): the LR never reaches its peak. Set optimizer.warmup_epochs below %.3g, '
        'or training_steps (or epochs) above %d.', training_steps, opt_config.warmup_epochs,
        num_train_examples, batch_size, warmup_steps, training_steps * batch_size / num_train_examples,
        math.ceil(warmup_steps))
  return warmup_cosine_schedule(peak, training_steps, warmup_steps, opt_config.get('min_lr', 0.0))


OPTIMIZERS = ('sgd', 'adamw', 'lamb')


def make_optimizer(opt_config, schedule: Callable) -> optax.GradientTransformation:
  """AGC (masked: not the classifier weight) in front of the configured optimizer, with the LR schedule.

  `opt_config.name`:
    'sgd': the paper's recipe (App. A.1): coupled L2 weight decay added to the clipped gradient, then
      SGD with (Nesterov) momentum. The order is the reference code's: AGC, decay, momentum, LR.
    'adamw', 'lamb': optax's optimizers with `b1`, `b2`, `eps` and their own decoupled weight decay.
  Weight decay skips gains and biases in every case (`nfnets.param_groups`).
  """
  if opt_config.name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name={opt_config.name!r} is not one of {OPTIMIZERS}')
  parts = []
  if opt_config.agc.enabled:
    parts.append(optax.masked(agc(opt_config.agc.clipping, opt_config.agc.eps), agc_mask))
  if opt_config.name == 'sgd':
    if opt_config.weight_decay:
      parts.append(optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask))
    if opt_config.momentum:
      parts.append(optax.trace(decay=opt_config.momentum, nesterov=opt_config.nesterov))
    parts.append(optax.scale_by_learning_rate(schedule))
  else:
    build = optax.adamw if opt_config.name == 'adamw' else optax.lamb
    parts.append(build(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                       weight_decay=opt_config.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
