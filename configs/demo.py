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
  c.model.num_classes = 10
  c.model.stochdepth_rate = 0.1
  c.optimizer.warmup_epochs = 2.0
  c.dataset.name = 'digits'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.eval_resize_pad = 0
  c.dataset.shuffle_buffer = 2000
  c.dataset.exact_resume = True          # replaying digits costs milliseconds
  c.dataset.augment.crop_area_min = 0.6     # digits fill the frame: keep most of it
  c.dataset.augment.random_flip = False     # a flipped digit is another glyph
  c.dataset.augment.mixup_alpha = 0.0
  c.dataset.augment.cutmix = False
  c.dataset.augment.randaugment = False
  return c
