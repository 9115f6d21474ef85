"""The shared NFNet recipe (paper App. A.1; the reference code's experiment_nfnets.py): every field is documented once, here.

Variant files call `get_config(model_name)` and change only what differs. Fields left as None are filled
from the model registry (`nfnets.registry`) or the dataset at run time, so no number lives in two places.
"""
import os

import ml_collections
from ml_collections import config_dict


def get_config(model_name: str = 'F0') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 4096                 # global batch, split over processes x devices x grad_accum_steps
  c.epochs = 360.0                    # run length in passes over the train split (the paper's ImageNet runs)
  # None: num_train_examples * epochs // batch_size, the reference code's rule (1281167 * 360 // 4096 =
  # 112,602 steps), so a new batch_size keeps 360 epochs. Set, it decides and epochs is ignored.
  c.training_steps = config_dict.placeholder(int)
  c.grad_accum_steps = 1              # micro-batches per optimizer step; the result equals one big batch
  c.dtype = 'bfloat16'                # forward/backward dtype; params, optimizer state and EMA stay f32
  c.seed = 0
  c.label_smoothing = 0.1
  c.ema_decay = 0.99999               # EMA decay t -> min(ema_decay, (1 + t) / (10 + t))
  c.log_every = 100                   # steps between train-metric fetches (the only host syncs)
  c.eval_every = 5000                 # steps between evals (and at the end); 0 disables periodic eval
  c.checkpoint_every = 1000           # steps between checkpoints (and at the end)
  c.keep_checkpoints = 3              # how many recent checkpoints to keep
  c.eval_batch_size = 500             # global; the last batch is padded and masked
  c.init_from = ''                    # a checkpoint or released weights to initialise params from
  c.finetune = False                  # True: a recipe that starts from init_from (a warning when it is empty)
  # True: a batch_size above the train split's size is lowered to it (to a multiple of processes x devices
  # x grad_accum_steps), so a step never repeats an example; fine-tuning on a small folder (finetune.py).
  c.fit_batch_to_data = False
  c.remat = False                     # jax.checkpoint each block: less memory, ~30% more compute
  # XLA:CPU only (ignored on GPU/TPU): compile the train step with XLA's memory-optimised instruction
  # scheduler instead of its concurrency-optimised default (docs/performance.md, Memory).
  c.cpu_memory_scheduler = True
  # JAX's persistent compilation cache: a restarted run (or another run of the same step) loads its compiled
  # programs from here instead of compiling them again. '' turns it off.
  c.compilation_cache_dir = os.path.join(os.environ.get('XDG_CACHE_HOME') or '~/.cache', 'nfnets', 'jax')

  c.model = ml_collections.ConfigDict()
  c.model.name = model_name           # a registry name: 'F0'..'F7', 'F0+'..'F7+', 'nf_resnet50', ...
  c.model.num_classes = 1000
  c.model.drop_rate = config_dict.placeholder(float)   # None: the variant's own rate (registry)
  c.model.stochdepth_rate = 0.25      # rate of the last block; block i of N gets rate * i / N
  # Architecture overrides (None: the registry variant's own). `width` is the constructor's width: a
  # multiplier of the variant's channels for NFNets (1.0), of 16/64/128/256/512 for NF-ResNets (4 =
  # ResNet-50's 256..2048). `depths` is the number of blocks per stage, e.g. (1, 1, 1, 1).
  c.model.width = config_dict.placeholder(float)
  c.model.depths = config_dict.placeholder(tuple)
  c.model.skip_gain_init = 0.0        # every residual branch's scalar gain at init (0: SkipInit, paper)
  # Conv lowering (nfnets/conv.py): 'auto' (XLA's on GPU/TPU; on CPU measured per shape and cached),
  # or by hand 'xla', 'split', 'matmul', 'tapgrad'.
  c.model.conv_impl = 'auto'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'            # 'sgd' (the paper: Nesterov, coupled L2), 'adamw' or 'lamb'
  c.optimizer.base_lr = 0.1           # LR per 256 images
  c.optimizer.scale_by_batch = True   # peak LR = base_lr * batch_size / 256 (1.6 at 4096)
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 2e-5     # not on gains/biases/skip_gain; coupled L2 for sgd, decoupled
                                      # (optax's own) for adamw/lamb, which usually want ~1e-2..5e-2
  c.optimizer.b1 = 0.9                # adamw/lamb moment decays and epsilon
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.warmup_epochs = 5.0     # linear warmup from 0, then cosine decay
  c.optimizer.min_lr = 0.0            # the cosine's final value
  c.optimizer.agc = ml_collections.ConfigDict()
  c.optimizer.agc.enabled = True      # AGC on every param except the classifier weight
  c.optimizer.agc.clipping = 0.01     # lambda
  c.optimizer.agc.eps = 1e-3
  # Sharpness-Aware Minimisation as the paper runs it (App. A.4): the ascent step on a fraction of each
  # device's batch, not averaged across devices. 0 disables it (the default recipe; F6 and fine-tuning
  # use 0.05).
  c.optimizer.sam_rho = 0.0
  c.optimizer.sam_batch_fraction = 0.2

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'imagenet2012'     # 'imagenet2012', any TFDS image dataset, 'folder', 'digits', 'fake'
  c.dataset.data_dir = config_dict.placeholder(str)   # TFDS data_dir, or the root of an image folder
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.image_size = config_dict.placeholder(int)       # None: the model's train size (registry)
  c.dataset.eval_image_size = config_dict.placeholder(int)  # None: the model's test size (registry)
  # Eval: square resize to eval_image_size + pad, centre crop (the reference code's resize_crop_32). None:
  # 32 at 256 px and above (the reference), round(size * 32 / 256) below, so small images keep the crop
  # ratio 256/288 (at 32 px a pad of 32 would keep only the middle half of each side).
  c.dataset.eval_resize_pad = config_dict.placeholder(int)
  # 'folder' data in the flat layout (<data_dir>/<class>/*): the fraction of each class's files (sorted,
  # spread evenly: 0.1 holds out files 0, 10, 20, ...) held out as the eval split. 0: none.
  c.dataset.folder_eval_fraction = 0.1
  # Host decoding runs in Grain: `num_workers` worker processes (0: threads of the training process;
  # each worker imports TensorFlow, seconds to start and ~0.5 GiB), `num_threads` threads in each process
  # (None: all cores without workers, 1 per worker). Eval uses threads only.
  c.dataset.num_workers = 0
  c.dataset.num_threads = config_dict.placeholder(int)
  # Deprecated and ignored (one warning line): every resume is exact, since the global batch at a step is
  # a function of (seed, step) (nfnets/data/pipeline.py).
  c.dataset.exact_resume = config_dict.placeholder(bool)
  c.dataset.augment = ml_collections.ConfigDict()
  c.dataset.augment.random_crop = True          # Inception-style random resized crop
  c.dataset.augment.crop_area_min = 0.08        # smallest crop area fraction
  c.dataset.augment.random_flip = True
  c.dataset.augment.mixup_alpha = 0.2           # MixUp on half the batch; 0 disables
  c.dataset.augment.cutmix = True               # CutMix on the other half
  c.dataset.augment.randaugment = True          # layers and magnitude from the registry unless set
  c.dataset.augment.ra_layers = config_dict.placeholder(int)
  c.dataset.augment.ra_magnitude = config_dict.placeholder(int)
  c.dataset.augment.ra_ops = 'reference'  # the paper's code and weights; 'pil': PIL-exact Solarize/Contrast/Sharpness
  return c


def use_digits(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches `c` to the built-in digits data (scikit-learn's 8x8 digits, upsampled to 32 px; nothing is
  downloaded): its train/test splits and 10 classes, light crops, no flips, no MixUp/CutMix/RandAugment.
  The demo, the digits fine-tune and the AGC study share it."""
  c.model.num_classes = 10
  d = c.dataset
  d.name = 'digits'
  d.train_split = 'train'             # 1,437 images
  d.eval_split = 'test'               # 360 images
  d.image_size = 32
  d.eval_image_size = 32
  d.eval_resize_pad = 0
  d.augment.crop_area_min = 0.6       # digits fill the frame: keep most of it
  d.augment.random_flip = False       # a flipped digit is another glyph
  d.augment.mixup_alpha = 0.0
  d.augment.cutmix = False
  d.augment.randaugment = False
  return c


def variant_config(variant: str, arg: str = '') -> ml_collections.ConfigDict:
  """Config for NFNet-`variant`; the config argument 'plus' selects the '+' variant (configs/f3.py:plus)."""
  if arg not in ('', 'plus'):
    raise ValueError(f"Unknown config argument {arg!r}; accepted: '' or 'plus'")
  return get_config(variant + '+' if arg == 'plus' else variant)
