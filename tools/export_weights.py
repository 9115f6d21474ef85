"""Converts NFNet weights between DeepMind's released files, timm state dicts and a flat .npz.

  python -m tools.export_weights F0_haiku.npz dm_nfnet_f0.safetensors   # released -> timm (safetensors or .npz)
  python -m tools.export_weights F0_haiku.npz f0_flat.npz                # released -> flat Haiku .npz
  python -m tools.export_weights model.safetensors f0_flat.npz --model F0  # timm -> flat Haiku .npz

The source is read as timm if it is .safetensors/.pth/.pt/.bin or a .npz of timm names, else as released
Haiku weights; it is checked against the registry model (`--model`, detected when omitted) before writing.
"""
import argparse
import os
import sys

from nfnets import checkpoint


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('src')
  parser.add_argument('dst')
  parser.add_argument('--model', default=None, help="registry name ('F0', 'F3+'); detected if omitted")
  parser.add_argument('--num_classes', type=int, default=None, help='taken from the file if omitted')
  parser.add_argument('--to', choices=('auto', 'timm', 'haiku'), default='auto',
                      help='output naming; auto: timm for .safetensors, else haiku (flat .npz)')
  args = parser.parse_args(argv)

  suffix = os.path.splitext(args.src)[1].lower()
  try:
    if suffix in ('.safetensors', '.pth', '.pt', '.bin', '.ckpt'):
      params = checkpoint.load_timm(args.src, args.model, args.num_classes)
    else:
      try:
        params = checkpoint.load_released(args.src, args.model, args.num_classes)
      except checkpoint.CheckpointError as e:
        if 'load_timm' not in str(e):
          raise
        params = checkpoint.load_timm(args.src, args.model, args.num_classes)
    to = args.to
    if to == 'auto':
      to = 'timm' if os.path.splitext(args.dst)[1].lower() == '.safetensors' else 'haiku'
    if to == 'timm':
      written = checkpoint.save_timm(params, args.dst)
    else:
      checkpoint.export_npz(params, args.dst)
      written = args.dst
  except (checkpoint.CheckpointError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {written} ({checkpoint.count_params(params):,} parameters, {to} names)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
