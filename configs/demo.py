"""A small NFNet on the built-in digits data (scikit-learn's handwritten digits), on a 2-core CPU.

`make demo` runs it. Nothing is downloaded.
"""
from configs import base


def get_config():
  c = base.get_config('nfnet_tiny')
  c.batch_size = 128
  c.training_steps = 2000
  c.dtype = 'float32'
  c.ema_decay = 0.999
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 200
  c.model.stochdepth_rate = 0.1
  c.optimizer.warmup_epochs = 2.0
  base.use_digits(c)
  return c
