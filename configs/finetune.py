"""Fine-tuning from pretrained weights with the paper's NFNet transfer recipe (Sec. 6.2, App. A.5), fitted to
the data it is given: on ImageNet exactly the paper's batch 2048, 15k steps, 5k-step linear warmup and peak LR
0.1 with cosine decay to 0; SAM with rho 0.05, weight decay 1e-5, dropout 0.25, stochastic depth 0.1, EMA
with warmup.

  python train.py --config=configs/finetune.py --workdir=runs/ft_flowers \\
      --config.init_from=F0_haiku.npz --config.model.name=F0 --config.model.num_classes=102 \\
      --config.dataset.name=oxford_flowers102 --config.dataset.train_split=train --config.dataset.eval_split=test

The run length follows the dataset: the paper's 15k steps at batch 2048 are 23.98 epochs of ImageNet's
1,281,167 images and its 5k warmup steps 7.99 epochs, so `epochs` and `optimizer.warmup_epochs` hold those
and any train split gets the same number of passes (`training_steps` is derived from `epochs`). The batch
is never larger than the train split (`fit_batch_to_data`): on a folder of 150 images it is 150, not 2048,
and the peak LR follows it linearly (0.1 x batch / 2048), as the base recipe scales its LR.

Fields to set:
  init_from            weights to start from: a run's workdir (its EMA params), DeepMind's released pickle,
                       a flat .npz or a timm file. Left empty, the run warns that it starts from a random init.
  model.name           the weights' model ('F0'..'F7', 'F0+'..'F7+', 'nfnet_tiny', ...).
  model.num_classes    the new task's class count. Every other param must fit the weights by name and shape;
                       a classifier of another width is re-initialised (std 0.01), which is the transfer case.
  dataset.*            any TFDS name, or 'folder' with dataset.data_dir (class subfolders), or 'digits'.
  epochs, optimizer.warmup_epochs
                       to train longer or shorter than the paper (small datasets often want more passes).

Resolution: the model's own train/test sizes unless dataset.image_size / eval_image_size are set (the paper
fine-tunes ResNets at 224, 320 and 384 px).

Config arguments (`--config=configs/finetune.py:tiny`):
  tiny    the demo's nfnet_tiny (from `make demo`'s runs/demo) on an image folder at 32 px, float32 for CPUs:
            python train.py --config=configs/finetune.py:tiny --workdir=runs/three_digits \\
                --config.init_from=runs/demo --config.dataset.data_dir=runs/samples/three_digits \\
                --config.model.num_classes=3
  digits  nfnet_tiny on the built-in digits at batch 128 (see `_digits`).

Differences from the paper:
  - SAM runs as the paper's ImageNet runs do (App. A.4: the ascent step on 20% of each device's batch, not
    averaged across devices); the paper does not say which SAM variant its fine-tuning used.
  - The paper does not list the fine-tuning augmentation; this config uses Inception crop + flip (the
    pre-training augmentation), no MixUp/CutMix/RandAugment. Label smoothing 0.1 and AGC (lambda 0.01) stay
    as in the base recipe.
  - The EMA decay is 0.9999 (the paper's ResNet fine-tuning value; it gives none for NFNets), with the base
    recipe's warmup min(decay, (1 + t) / (10 + t)).
"""
import ml_collections

from configs import base
from nfnets.data.info import IMAGENET_TRAIN_EXAMPLES

PAPER_BATCH = 2048
PAPER_STEPS = 15_000
PAPER_WARMUP_STEPS = 5_000


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  if arg not in ('', 'tiny', 'digits'):
    raise ValueError(f"Unknown config argument {arg!r}; accepted: '' (the paper's recipe), 'tiny' or 'digits'")
  c = base.get_config('F0')
  c.finetune = True                   # warns when init_from is empty
  c.init_from = ''
  c.batch_size = PAPER_BATCH
  c.fit_batch_to_data = True          # at most the train split
  c.epochs = PAPER_STEPS * PAPER_BATCH / IMAGENET_TRAIN_EXAMPLES    # 23.98: 15,000 steps on ImageNet
  c.ema_decay = 0.9999
  c.eval_every = 1000
  c.checkpoint_every = 1000

  c.model.drop_rate = 0.25
  c.model.stochdepth_rate = 0.1

  # The paper's peak LR 0.1 at its batch 2048, scaled linearly when the batch is fitted to a smaller train
  # split (the base recipe's rule: peak = base_lr * batch_size / 256).
  c.optimizer.base_lr = 0.1 * 256 / PAPER_BATCH
  c.optimizer.scale_by_batch = True
  c.optimizer.weight_decay = 1e-5
  c.optimizer.sam_rho = 0.05
  c.optimizer.warmup_epochs = PAPER_WARMUP_STEPS * PAPER_BATCH / IMAGENET_TRAIN_EXAMPLES   # 7.99: 5,000 steps

  a = c.dataset.augment
  a.random_crop = True
  a.random_flip = True
  a.mixup_alpha = 0.0
  a.cutmix = False
  a.randaugment = False
  if arg == 'tiny':
    _tiny(c)
  elif arg == 'digits':
    _digits(c)
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  """The demo model (nfnet_tiny, 32 px, float32 for CPUs) on an image folder; set dataset.data_dir,
  model.num_classes and init_from (the demo run, runs/demo). Logs, evals and checkpoints every 10 steps:
  a small folder gives a few dozen steps."""
  c.model.name = 'nfnet_tiny'
  c.dtype = 'float32'
  c.log_every = 10
  c.eval_every = 10
  c.checkpoint_every = 10
  c.eval_batch_size = 200
  d = c.dataset
  d.name = 'folder'
  d.image_size = 32
  d.eval_image_size = 32
  d.eval_resize_pad = 0               # small images: evaluate the whole image, as the demo does
  d.augment.crop_area_min = 0.35      # a 32 px crop of 8% of a small image keeps too little of it


def _digits(c: ml_collections.ConfigDict) -> None:
  """Fine-tunes the demo's nfnet_tiny on digits with the recipe's shape, sized for a 2-core CPU (~1-2 min).

    make demo        # or: python train.py --config=configs/demo.py --workdir=runs/demo
    python train.py --config=configs/finetune.py:digits --workdir=runs/finetune_digits \\
        --config.init_from=runs/demo

  Batch 128 (24 epochs of digits' 1,437 train images: 269 steps, 90 of them warmup; peak LR 0.00625),
  weight decay 1e-5, dropout 0.25, stochastic depth 0.1 and EMA as the recipe. Data, eval preprocessing and
  augmentation strength: `base.use_digits`, as in configs/demo.py.
  """
  c.batch_size = 128
  c.dtype = 'float32'
  c.log_every = 50
  c.eval_every = 100
  c.checkpoint_every = 100
  c.eval_batch_size = 200
  c.model.name = 'nfnet_tiny'
  base.use_digits(c)
