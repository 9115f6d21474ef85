"""NF-ResNet-50 as in the paper's AGC study (Sec. 4.1): 90 epochs, ResNet augmentation.

Batch and lambda are the swept fields: `--config.batch_size=1024 --config.optimizer.agc.clipping=0.02`.
"""
from configs import base


def get_config():
  c = base.get_config('nf_resnet50')
  c.epochs = 90                       # a new batch_size keeps 90 epochs
  c.dtype = 'float32'
  c.optimizer.weight_decay = 5e-5
  c.dataset.augment.mixup_alpha = 0.0
  c.dataset.augment.cutmix = False
  c.dataset.augment.randaugment = False
  return c
