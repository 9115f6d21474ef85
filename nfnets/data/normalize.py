"""The ImageNet mean/std standardisation every model input gets (the reference code's dataset.py), in JAX.

One definition for every caller: the train and eval steps apply it on the device, tools.predict and
tools.linear_probe inside their jitted model calls, tools.export inside the exported graph. It imports
neither TensorFlow nor the data pipeline, so inference-only programs and exported graphs stay light.
"""
import jax.numpy as jnp
import numpy as np

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# A product with the float32 reciprocal, written out: XLA rewrites a division by a constant into this
# product, but not a division by a value it cannot see (an argument, a barrier), so spelling it out gives
# the same bits in every program (train step, eval step, predict, the exported graph).
_INV_STDDEV = (np.float32(1) / np.asarray(STDDEV_RGB, np.float32)).astype(np.float32)


def normalize(images) -> jnp.ndarray:
  """float32 (images - mean) / std per RGB channel, for pixels in 0..255 (uint8 or float)."""
  images = jnp.asarray(images).astype(jnp.float32)
  return (images - jnp.asarray(MEAN_RGB, jnp.float32)) * jnp.asarray(_INV_STDDEV)
