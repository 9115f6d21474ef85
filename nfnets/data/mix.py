"""MixUp and CutMix on one device batch, as the reference code pairs them (deepmind-research/nfnets dataset.py).

A device batch of `bs` images is built from 2*bs examples. With both on, MixUp blends the first bs//2 pairs
(x[i] with x[i + q]) and CutMix the remaining pairs; with one on, it mixes all bs pairs. Targets are the
soft one-hot mix (rows sum to 1, no smoothing); `hard_labels` is the first image's label.
"""
import tensorflow as tf


def sample_beta(key: tf.Tensor, shape, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) as G1 / (G1 + G2): TF has no stateless Beta sampler."""
  k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  g1 = tf.random.stateless_gamma(shape, k1, alpha=alpha)
  g2 = tf.random.stateless_gamma(shape, k2, alpha=alpha)
  total = g1 + g2
  # Both gammas can underflow to 0 for tiny alpha; call that an even mix rather than NaN.
  return tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)


def mixup(x1, x2, key, alpha: float):
  """Images r*x1 + (1-r)*x2 and ratios r ~ Beta(alpha, alpha), one per pair."""
  ratio = sample_beta(key, tf.shape(x1)[:1], alpha)
  r = ratio[:, None, None, None]
  return r * x1 + (1 - r) * x2, ratio


def cutmix_masks(key: tf.Tensor, n, height: int, width: int) -> tf.Tensor:
  """float32 [n, H, W, 1] boxes as the reference's cutmix_padding: centre uniform, side sqrt(1-U)*size."""
  ky, kx, ku = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  cy = tf.random.stateless_uniform([n], ky, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([n], kx, 0, width, tf.int32)
  side = tf.sqrt(1.0 - tf.random.stateless_uniform([n], ku))
  half_h = tf.cast(side * height, tf.int32) // 2
  half_w = tf.cast(side * width, tf.int32) // 2
  y0, y1 = tf.clip_by_value(cy - half_h, 0, height), tf.clip_by_value(cy + half_h, 0, height)
  x0, x1 = tf.clip_by_value(cx - half_w, 0, width), tf.clip_by_value(cx + half_w, 0, width)
  ys, xs = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
  inside = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None]) &
            (xs >= x0[:, None, None]) & (xs < x1[:, None, None]))
  return tf.cast(inside, tf.float32)[..., None]


def cutmix(x1, x2, key):
  """Box from x1 pasted on x2; the ratio (x1's label weight) is the box's area fraction."""
  masks = cutmix_masks(key, tf.shape(x1)[0], x1.shape[1], x1.shape[2])
  return masks * x1 + (1 - masks) * x2, tf.reduce_mean(masks, axis=[1, 2, 3])


def mix_batch(images, labels, key, *, num_classes: int, mixup_alpha: float, use_cutmix: bool):
  """2*bs examples -> (images [bs, ...], soft targets [bs, num_classes], hard labels [bs])."""
  if mixup_alpha < 0:
    raise ValueError(f'mixup_alpha must be >= 0, got {mixup_alpha}')
  use_mixup = mixup_alpha > 0
  if not (use_mixup or use_cutmix):
    raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix')
  bs = images.shape[0] // 2
  # q pairs for MixUp, bs - q for CutMix; the pair of example i is example i + (number of pairs).
  q = (bs // 2 if use_cutmix else bs) if use_mixup else 0
  k_mix, k_cut = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  parts_x, parts_r, first, second = [], [], [], []
  if q:
    x, r = mixup(images[:q], images[q:2 * q], k_mix, mixup_alpha)
    parts_x.append(x), parts_r.append(r), first.append(labels[:q]), second.append(labels[q:2 * q])
  if bs - q:
    c = bs - q
    x, r = cutmix(images[2 * q:2 * q + c], images[2 * q + c:], k_cut)
    parts_x.append(x), parts_r.append(r)
    first.append(labels[2 * q:2 * q + c]), second.append(labels[2 * q + c:])
  ratio = tf.concat(parts_r, 0)[:, None]
  hard = tf.concat(first, 0)
  soft = (ratio * tf.one_hot(hard, num_classes) +
          (1 - ratio) * tf.one_hot(tf.concat(second, 0), num_classes))
  return tf.concat(parts_x, 0), soft, hard
