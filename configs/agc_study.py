"""The AGC study (paper §4.1, Fig. 2) at CPU scale, on the built-in digits data at 32 px.

The swept fields are batch_size (with training_steps), optimizer.base_lr and optimizer.agc.enabled /
clipping; the driver is `python -m nfnets.research.agc_study`. As in the paper: SGD-Nesterov, base LR per
256 images scaled linearly with the batch, crop augmentation only, no MixUp/CutMix/RandAugment, no label
smoothing. Unlike the paper: ~12 epochs instead of 90, and a 1-epoch warmup, so large learning rates bite.

The model is nfnet_tiny (a 4-block normalizer-free network with NFNet blocks), not an NF-ResNet: the
registry's smallest NF-ResNet, nf_resnet26 (16M params), trains at ~35-40 img/s on a 2-core CPU at 32 px
(measured), ~15x slower than nfnet_tiny, too slow for a 24-run grid in 30 minutes. The NF-ResNet study is
`--model=nf_resnet26` (or `--config.model.name=nf_resnet26`) with a larger budget.
"""
from configs import base


def get_config():
  c = base.get_config('nfnet_tiny')
  c.batch_size = 256
  c.training_steps = 150
  c.dtype = 'float32'
  c.label_smoothing = 0.0
  c.ema_decay = 0.99
  c.log_every = 5    
  c.eval_every = 0                 # evaluate once, at the end
  c.checkpoint_every = 10_000      # checkpoint once, at the end
  c.keep_checkpoints = 1
  c.eval_batch_size = 120
  c.model.num_classes = 10
  c.model.stochdepth_rate = 0.0
  c.optimizer.base_lr = 0.1
  c.optimizer.weight_decay = 5e-5
  c.optimizer.warmup_epochs = 1.0
  c.optimizer.agc.enabled = True
  c.optimizer.agc.clipping = 0.01
  c.dataset.name = 'digits'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 32
  c.dataset.eval_image_size = 32
  c.dataset.eval_resize_pad = 0
  c.dataset.shuffle_buffer = 2000
  c.dataset.augment.crop_area_min = 0.6
  c.dataset.augment.random_flip = False
  c.dataset.augment.mixup_alpha = 0.0
  c.dataset.augment.cutmix = False
  c.dataset.augment.randaugment = False
  return c
