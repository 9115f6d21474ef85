"""The batch-level train augmentation, run on the device inside the train step: MixUp/CutMix, RandAugment,
normalisation.

The host pipeline (nfnets.data.pipeline) only decodes, crops, flips and resizes, and sends uint8 images and
int labels. The rest runs here, once per device batch, in the reference code's order (deepmind-research/
nfnets dataset.py, augment_before_mix=False): mix the float pixels, then RandAugment the mixed image
(clipped to 0..255 and truncated to uint8, as the reference casts it), then normalise. Moving it off the
host halves the examples the host decodes per train image (see nfnets.data.mix) and removes RandAugment's
per-image TF ops from the host, which were most of its work.
"""
import jax
import jax.numpy as jnp

from nfnets.data import mix, randaugment
from nfnets.data.normalize import normalize


def augment_batch(images, labels, key, *, num_classes: int, mixup_alpha: float = 0.0, cutmix: bool = False,
                  ra_layers: int = 0, ra_magnitude: float = 0.0, ra_ops: str = 'reference'):
  """One device batch -> (normalised float32 images [N, H, W, 3], soft targets [N, num_classes], int32 hard
  labels [N]). Pure JAX; every argument after `key` is static.

  Args:
    images: uint8 (or float, 0..255) [N, H, W, 3], N >= 2 when mixing.
    labels: int [N].
    key: a JAX PRNG key; the same key gives the same batch.
    mixup_alpha, cutmix: MixUp's Beta(alpha, alpha) (0: off) and CutMix on/off (nfnets.data.mix).
    ra_layers, ra_magnitude, ra_ops: RandAugment (0 layers: off), as nfnets.data.randaugment.
  With everything off this is one-hot targets and normalisation, nothing else.
  """
  labels = labels.astype(jnp.int32)
  x = images.astype(jnp.float32)
  mix_key, ra_key = jax.random.split(key)
  if mixup_alpha > 0 or cutmix:
    x, targets, labels = mix.mix_batch(x, labels, mix_key, num_classes=num_classes, mixup_alpha=mixup_alpha,
                                       use_cutmix=cutmix)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if ra_layers > 0:
    pixels = jnp.clip(x, 0, 255).astype(jnp.uint8)
    x = randaugment.randaugment(pixels, ra_key, ra_layers, ra_magnitude, ra_ops).astype(jnp.float32)
  return normalize(x), targets, labels
