"""Writes tests/fixtures/timm_nfnet_tiny.npz: a reduced timm DeepMind-NFNet, an input and timm's logits.

Why: `tests/test_timm_fixture.py` checks that `nfnets.weights.from_timm` maps a timm `dm_nfnet_f*` state
dict onto the project's NFNet exactly, by comparing logits. torch and timm are not project dependencies,
so the timm side is computed once, here, and committed as a small NumPy-only file; the test then runs
under `make test` without torch.

How to regenerate (from the repository root, with torch and timm in a virtualenv outside the repo):

  python3 -m venv /tmp/tvenv
  /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
  /tmp/tvenv/bin/python tools/make_timm_fixture.py          # or: ... make_timm_fixture.py OUT.npz

Written with torch 2.14.1 and timm 1.0.31. The output is deterministic for a given torch/timm version.

The model is timm's `dm_nfnet_f0` family (`_dm_nfnet_cfg`: deep_quad stem, two grouped 3x3 convs per
block, SE with attention gain 2, skipinit gains, final conv of 2x the last stage width, TF 'SAME'
padding) with small sizes, chosen so the project's `nfnets.NFNet` overrides express it exactly:

  timm:    channels=(16, 32, 64, 64), depths=(1, 2, 1, 1), group_size=8, stem_chs=8
           -> stem convs (1, 2, 4, 8), bottleneck widths (8, 16, 32, 32) in (1, 2, 4, 4) groups,
              SE hidden (8, 16, 32, 32), final conv 128
  project: NFNet(num_classes, variant='F0', depths=(1, 2, 1, 1), widths=(16, 32, 64, 64),
                 group_width=8, stem_widths=(1, 2, 4))   # 4th stem conv = widths[0] // 2 = 8
  Stage 1 has two blocks, so an identity-shortcut block (beta < 1) is covered too.

Two numerical differences between timm and DeepMind's code are removed, so the logits agree to float32
rounding: timm's ScaledStdConv2dSame adds eps=1e-5 to the weight variance where DeepMind floors
fan_in * var at 1e-4 (here eps=1e-10; with N(0, 1) weights fan_in * var is far above both, so neither
takes effect), and timm's NFNets use exact GELU where DeepMind uses the tanh approximation (here
act_layer='gelu_tanh', with the same gamma as 'gelu', as DeepMind uses). Measured on this model: max
|diff| 2.4e-6 as set here, 1.5e-4 with timm's default eps, 1.4e-3 with exact GELU.

Every parameter is drawn from one seeded generator: conv/linear weights N(0, 1) (convs are standardised
anyway), gains and skipinit gains 1 + 0.2 N(0, 1), biases 0.2 N(0, 1); the head gets N(0, 1/fan_in) so
logits are O(1). The skipinit gains (0 at init) and conv3 gains are therefore non-trivial.

File contents (all plain arrays, no pickles; read with `np.load(path)`):
  sd/<timm name>  every tensor of timm's state_dict(), float32, timm layout (OIHW convs, (out, in) fc)
  input_nchw      float32 (2, 3, 64, 64), NCHW as given to timm; transpose (0, 2, 3, 1) for NHWC
  logits          float32 (2, num_classes), timm eval-mode output
  depths, channels, group_size, stem_chs, num_classes, num_features, std_conv_eps   the reduced config
  act_layer, timm_version, torch_version   strings (0-d unicode arrays)
"""
import dataclasses
import os
import sys

import numpy as np
import timm
import torch
from timm.models import nfnet as timm_nfnet

DEPTHS = (1, 2, 1, 1)
CHANNELS = (16, 32, 64, 64)
GROUP_SIZE = 8
STEM_CHS = CHANNELS[0] // 2  # the project's 4th stem conv has widths[0] // 2 channels
NUM_CLASSES = 10
STD_CONV_EPS = 1e-10
ACT = 'gelu_tanh'
INPUT_SHAPE = (2, 3, 64, 64)
SEED = 0
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests', 'fixtures',
                           'timm_nfnet_tiny.npz')


def build_model() -> torch.nn.Module:
  # timm has no gamma for 'gelu_tanh'; DeepMind uses GELU's gamma for its tanh-form GELU.
  timm_nfnet._nonlin_gamma.setdefault(ACT, timm_nfnet._nonlin_gamma['gelu'])
  cfg = timm_nfnet._dm_nfnet_cfg(depths=DEPTHS, channels=CHANNELS, act_layer=ACT)
  cfg = dataclasses.replace(cfg, group_size=GROUP_SIZE, stem_chs=STEM_CHS, std_conv_eps=STD_CONV_EPS)
  model = timm_nfnet.NormFreeNet(cfg, num_classes=NUM_CLASSES)
  convs = [m for m in model.modules() if type(m).__name__.startswith('ScaledStdConv2d')]
  assert convs and all(m.eps == STD_CONV_EPS for m in convs), 'std_conv_eps did not reach the convs'
  return model.eval()


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name == 'head.fc.weight':
        p.copy_(noise / p.shape[1] ** 0.5)
      elif name.endswith('.weight'):
        p.copy_(noise)
      elif 'gain' in name:  # conv gains and skipinit_gain
        p.copy_(1 + 0.2 * noise)
      else:  # biases
        p.copy_(0.2 * noise)


def main(argv) -> int:
  out = argv[1] if len(argv) > 1 else DEFAULT_OUT
  torch.manual_seed(SEED)
  model = build_model()
  gen = torch.Generator().manual_seed(SEED)
  randomize(model, gen)
  x = torch.randn(INPUT_SHAPE, generator=gen)
  with torch.no_grad():
    logits = model(x)
  arrays = {f'sd/{k}': v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  arrays.update(
      input_nchw=x.numpy().astype(np.float32),
      logits=logits.numpy().astype(np.float32),
      depths=np.array(DEPTHS, np.int32),
      channels=np.array(CHANNELS, np.int32),
      group_size=np.array(GROUP_SIZE, np.int32),
      stem_chs=np.array(STEM_CHS, np.int32),
      num_classes=np.array(NUM_CLASSES, np.int32),
      num_features=np.array(model.num_features, np.int32),
      std_conv_eps=np.array(STD_CONV_EPS, np.float64),
      act_layer=np.array(ACT),
      timm_version=np.array(timm.__version__),
      torch_version=np.array(torch.__version__),
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez_compressed(out, **arrays)
  n_params = sum(p.numel() for p in model.parameters())
  print(f'{len(model.state_dict())} tensors, {n_params} parameters; logits {tuple(logits.shape)}, '
        f'|logits| max {logits.abs().max().item():.3f}')
  print(f'wrote {os.path.normpath(out)}: {os.path.getsize(out)} bytes')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
