"""Converts NFNet weights between DeepMind's released files, timm state dicts and a flat .npz.

  python -m tools.export_weights F0_haiku.npz dm_nfnet_f0.safetensors   # released -> timm (safetensors or .npz)
  python -m tools.export_weights F0_haiku.npz f0_flat.npz                # released -> flat Haiku .npz
  python -m tools.export_weights model.safetensors f0_flat.npz --model F0  # timm -> flat Haiku .npz

The source is read by `nfnets.weights.read` (timm for .safetensors/.pth/.pt/.bin or a .npz of timm names,
else released or flat Haiku weights) and checked against the registry model (`--model`, detected when
omitted) before anything is written. A source that does not fit is one `error:` line (the first line of the
mismatch report) and exit status 2, as for every command (`nfnets.console`).
"""
import argparse
import os
import sys

from nfnets import console
from nfnets import weights


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('src')
  parser.add_argument('dst')
  parser.add_argument('--model', default=None, help="registry name ('F0', 'F3+'); detected if omitted")
  parser.add_argument('--num_classes', type=int, default=None, help='taken from the file if omitted')
  parser.add_argument('--to', choices=('auto', 'timm', 'haiku'), default='auto',
                      help='output naming; auto: timm for .safetensors, else haiku (flat .npz)')
  args = parser.parse_args(argv)

  try:
    params = weights.read(args.src)
    weights.validate(params, args.model, args.num_classes, source=args.src)
    to = args.to
    if to == 'auto':
      to = 'timm' if os.path.splitext(args.dst)[1].lower() == '.safetensors' else 'haiku'
    if to == 'timm':
      written = weights.save_timm(params, args.dst)
    else:
      weights.export_npz(params, args.dst)
      written = args.dst
  except (ValueError, FileNotFoundError, ImportError) as e:  # WeightsError, or an unknown --model
    return console.user_error(e)
  print(f'wrote {written} ({weights.count_params(params):,} parameters, {to} names)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
