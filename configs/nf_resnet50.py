"""NF-ResNet-50 for the AGC study (paper §4.1): 90 epochs, ResNet augmentation, no EMA-critical recipe.

Batch and lambda are the swept fields: `--config.batch_size=1024 --config.optimizer.agc.clipping=0.02`.
"""
from configs import base
from nfnets.data.info import IMAGENET_TRAIN_EXAMPLES


def get_config():
  c = base.get_config('nf_resnet50')
  c.training_steps = IMAGENET_TRAIN_EXAMPLES * 90 // c.batch_size
  c.dtype = 'float32'
  c.optimizer.weight_decay = 5e-5
  c.dataset.augment.mixup_alpha = 0.0
  c.dataset.augment.cutmix = False
  c.dataset.augment.randaugment = False
  return c
