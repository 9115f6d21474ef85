"""MixUp and CutMix on one device batch, in JAX, with the reference code's laws (deepmind-research/nfnets
dataset.py: my_mixup, my_cutmix, cutmix_padding).

The reference builds a device batch of N images from 2N decoded examples: output i blends example i with
example i + N. Here each output i blends image i with its partner, image (i + N//2) % N of the same batch, so
the host decodes one example per train image. The partner is a different image for any N >= 2, and the
batch comes from a shuffled stream, so each output is still a blend of two distinct, randomly drawn
examples with a fresh Beta ratio or CutMix box: the law of every single output image and target is the
reference's. Only the joint law within a batch changes: for even N the pairing is mutual (i <-> i + N/2),
so each pair of examples appears in two outputs, with its own ratio or box each; with both MixUp and CutMix
on, one is a MixUp and the other a CutMix, never two MixUps of the same pair.

The split is the reference's: with both on, MixUp makes the first N//2 outputs and CutMix the rest; with one
on, it makes all N. Targets are the soft one-hot mix r * onehot(y_i) + (1 - r) * onehot(y_partner) (rows
sum to 1, no smoothing); the hard label is y_i.
"""
import jax
import jax.numpy as jnp


def partner_shift(n: int) -> int:
  """The roll that puts image (i + n//2) % n at position i; distinct from i for n >= 2."""
  return -(n // 2)


def mixup(x1, x2, key, alpha: float):
  """Images r * x1 + (1 - r) * x2 and ratios r ~ Beta(alpha, alpha), one per image."""
  ratio = jax.random.beta(key, alpha, alpha, (x1.shape[0],), jnp.float32)
  r = ratio[:, None, None, None]
  return r * x1 + (1 - r) * x2, ratio


def cutmix_masks(key, n: int, height: int, width: int):
  """float32 [n, H, W, 1] boxes as the reference's cutmix_padding: centre uniform over the pixels, side
  sqrt(1 - U) of the image's (truncated to whole pixels, halved by integer division), clipped at borders."""
  ky, kx, ku = jax.random.split(key, 3)
  cy = jax.random.randint(ky, (n,), 0, height)
  cx = jax.random.randint(kx, (n,), 0, width)
  side = jnp.sqrt(1.0 - jax.random.uniform(ku, (n,)))
  half_h = (side * height).astype(jnp.int32) // 2
  half_w = (side * width).astype(jnp.int32) // 2
  y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
  x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
  ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  inside = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None]) &
            (xs >= x0[:, None, None]) & (xs < x1[:, None, None]))
  return inside.astype(jnp.float32)[..., None]


def cutmix(x1, x2, key):
  """A box of x1 pasted on x2; the ratio (x1's label weight) is the box's area fraction."""
  masks = cutmix_masks(key, x1.shape[0], x1.shape[1], x1.shape[2])
  return jnp.where(masks > 0, x1, x2), jnp.mean(masks, axis=(1, 2, 3))


def mix_batch(images, labels, key, *, num_classes: int, mixup_alpha: float, use_cutmix: bool):
  """N float images [N, H, W, C] and int labels [N] -> (mixed images, soft targets [N, num_classes],
  hard labels [N]); see the module docstring for the pairing and the split."""
  if mixup_alpha < 0:
    raise ValueError(f'mixup_alpha must be >= 0, got {mixup_alpha}')
  use_mixup = mixup_alpha > 0
  if not (use_mixup or use_cutmix):
    raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix')
  n = images.shape[0]
  if n < 2:
    raise ValueError(f'MixUp/CutMix need at least 2 images per device, got {n}')
  other_images = jnp.roll(images, partner_shift(n), axis=0)
  other_labels = jnp.roll(labels, partner_shift(n), axis=0)
  q = (n // 2 if use_cutmix else n) if use_mixup else 0   # the first q outputs are MixUps
  k_mix, k_cut = jax.random.split(key)
  parts_x, parts_r = [], []
  if q:
    x, r = mixup(images[:q], other_images[:q], k_mix, mixup_alpha)
    parts_x.append(x), parts_r.append(r)
  if n - q:
    x, r = cutmix(images[q:], other_images[q:], k_cut)
    parts_x.append(x), parts_r.append(r)
  ratio = jnp.concatenate(parts_r)[:, None]
  soft = (ratio * jax.nn.one_hot(labels, num_classes) +
          (1 - ratio) * jax.nn.one_hot(other_labels, num_classes))
  return jnp.concatenate(parts_x), soft, labels
