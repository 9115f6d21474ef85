"""Fine-tuning from pretrained weights with the paper's NFNet transfer recipe (Sec. 6.2, App. A.5): batch
2048, 15k steps, LR 0.1 (not scaled by batch size) with a 5k-step linear warmup and cosine decay to 0, SAM
with rho 0.05, weight decay 1e-5, dropout 0.25, stochastic depth 0.1, EMA with warmup.

  python train.py --config=configs/finetune.py --workdir=runs/ft_flowers \\
      --config.init_from=F0_haiku.npz --config.model.name=F0 --config.model.num_classes=102 \\
      --config.dataset.name=oxford_flowers102 --config.dataset.train_split=train \\
      --config.dataset.eval_split=test --config.transfer.num_train_examples=1020

Fields to set:
  init_from            weights to start from: a run's workdir (its EMA params), DeepMind's released pickle,
                       a flat .npz or a timm file. Nothing checks that it is set: left empty, the run trains
                       from a random init.
  model.name           the weights' model ('F0'..'F7', 'F0+'..'F7+', 'nfnet_tiny', ...).
  model.num_classes    the new task's class count. Every other param must fit the weights by name and shape;
                       a classifier of another width is re-initialised (std 0.01), which is the transfer case.
  dataset.*            any TFDS name, or 'folder' with dataset.data_dir (class subfolders), or 'digits'.
  transfer.num_train_examples
                       the train split's size: warmup_epochs is derived from it so that the warmup lasts
                       transfer.warmup_steps steps whatever batch_size is (or set optimizer.warmup_epochs).

Resolution: the model's own train/test sizes unless dataset.image_size / eval_image_size are set (the paper
fine-tunes ResNets at 224, 320 and 384 px).

Differences from the paper:
  - SAM runs as the paper's ImageNet runs do (App. A.4: the ascent step on 20% of each device's batch, not
    averaged across devices); the paper does not say which SAM variant its fine-tuning used.
  - The paper does not list the fine-tuning augmentation; this config uses Inception crop + flip (the
    pre-training augmentation), no MixUp/CutMix/RandAugment. Label smoothing 0.1 and AGC (lambda 0.01) stay
    as in the base recipe.
  - The EMA decay is 0.9999 (the paper's ResNet fine-tuning value; it gives none for NFNets), with the base
    recipe's warmup min(decay, (1 + t) / (10 + t)).

`--config=configs/finetune.py:digits` is a CPU-sized example: nfnet_tiny on the built-in digits, starting from
the checkpoint that `make demo` writes to runs/demo (see that function's docstring).
"""
import ml_collections

from configs import base
from nfnets.data.info import IMAGENET_TRAIN_EXAMPLES


def _set_warmup(c: ml_collections.ConfigDict) -> None:
  """warmup_epochs = warmup_steps * batch_size / num_train_examples, kept up to date by reference."""
  steps_times_batch = c.transfer.get_ref('warmup_steps') * c.get_ref('batch_size')
  c.optimizer.warmup_epochs = steps_times_batch.to_float() / c.transfer.get_ref('num_train_examples')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'digits'):
    raise ValueError(f"Unknown config argument {arg!r}; accepted: '' (the paper's recipe) or 'digits'")
  c = base.get_config('F0')
  c.init_from = ''                    # required in practice: see the module docstring
  c.batch_size = 2048
  c.training_steps = 15_000
  c.ema_decay = 0.9999
  c.eval_every = 1000
  c.checkpoint_every = 1000

  c.model.drop_rate = 0.25
  c.model.stochdepth_rate = 0.1

  c.optimizer.base_lr = 0.1           # the peak LR itself: no batch scaling in the transfer recipe
  c.optimizer.scale_by_batch = False
  c.optimizer.weight_decay = 1e-5
  c.optimizer.sam_rho = 0.05
  c.transfer = ml_collections.ConfigDict()
  c.transfer.warmup_steps = 5000      # linear warmup length in steps, then cosine to min_lr
  c.transfer.num_train_examples = IMAGENET_TRAIN_EXAMPLES  # of dataset.train_split; sets warmup_epochs
  _set_warmup(c)

  a = c.dataset.augment
  a.random_crop = True
  a.random_flip = True
  a.mixup_alpha = 0.0
  a.cutmix = False
  a.randaugment = False
  if arg == 'digits':
    _digits(c)
  return c


def _digits(c: ml_collections.ConfigDict) -> None:
  """Fine-tunes the demo's nfnet_tiny on digits with the recipe's shape, sized for a 2-core CPU (~1-2 min).

    make demo        # or: python train.py --config=configs/demo.py --workdir=runs/demo
    python train.py --config=configs/finetune.py:digits --workdir=runs/finetune_digits \\
        --config.init_from=runs/demo

  Steps, warmup and batch are scaled down (300 steps, 100 warmup, batch 128: the recipe's 1/3 warmup
  fraction); LR 0.1 unscaled, weight decay 1e-5, dropout 0.25, stochastic depth 0.1 and EMA as the recipe.
  Data, eval preprocessing and augmentation strength: `base.use_digits`, as in configs/demo.py.
  """
  c.batch_size = 128
  c.training_steps = 300
  c.dtype = 'float32'
  c.log_every = 50
  c.eval_every = 100
  c.checkpoint_every = 100
  c.eval_batch_size = 200
  c.model.name = 'nfnet_tiny'
  c.transfer.warmup_steps = 100
  c.transfer.num_train_examples = 1437          # digits 'train' (the other 360 are 'test')
  base.use_digits(c)
