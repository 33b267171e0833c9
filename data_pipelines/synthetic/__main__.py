"""CLI: writes a synthetic METRO TSV dataset rendered from the embedded body or hand.

  python -m data_pipelines.synthetic --out /data/synthetic \\
      --num_train 10000 --num_test 1000 [--seed 0] [--workers 2] \\
      [--image_size 256] [--contact_sheet docs/synthetic_samples.png] \\
      [--contact_sheet_count 16] [--contact_sheet_tile 128]
  python -m data_pipelines.synthetic --hand --out /data/synthetic_hand \\
      --num_train 10000 --num_test 1000 [--image_size 224] \\
      [--contact_sheet docs/synthetic_hand_samples.png]

writes DIR/train.{img,hw,label,linelist}.tsv (+ .lineidx) and DIR/train.yaml,
and the same for test; use DIR/train.yaml and DIR/test.yaml as
config.data.train_yaml / eval_yaml. --hand writes FreiHAND-format hand rows
(right and left hands; data_pipelines/synthetic/hand_render.py) for
config.model.hand.
"""

import argparse
import os
import sys
import time

from data_pipelines.synthetic import generate


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m data_pipelines.synthetic',
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--num_train', type=int, default=10000)
  p.add_argument('--num_test', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0, help='dataset seed (train and test streams differ)')
  p.add_argument(
      '--workers',
      type=int,
      default=os.cpu_count() or 1,
      help='render processes (the output does not depend on it)',
  )
  p.add_argument('--hand', action='store_true', help='render hands (FreiHAND format)')
  p.add_argument(
      '--image_size',
      type=int,
      default=0,
      help='square image side in px (0 = 256 for bodies, 224 for hands as FreiHAND)',
  )
  p.add_argument(
      '--backend',
      default='auto',
      choices=('auto', 'numba', 'numpy'),
      help='rasterizer (the output does not depend on it)',
  )
  p.add_argument('--body_model', default='', help="body model path ('' = embedded body)")
  p.add_argument(
      '--hand_model', default='', help="with --hand: MANO-format hand ('' = embedded hand)"
  )
  p.add_argument('--contact_sheet', default='', help='optional PNG grid of train samples')
  p.add_argument('--contact_sheet_count', type=int, default=16, help='train samples on the sheet')
  p.add_argument(
      '--contact_sheet_tile',
      type=int,
      default=0,
      help='tile side in px on the sheet (0 = image_size)',
  )
  p.add_argument('--quiet', action='store_true', help='no progress bar')
  args = p.parse_args(argv)
  args.image_size = args.image_size or (224 if args.hand else 256)
  if (args.body_model and args.hand) or (args.hand_model and not args.hand):
    p.error('--body_model renders bodies and --hand_model hands (with --hand); not both')
  if args.num_train < 0 or args.num_test < 0 or args.image_size < 32 or args.workers < 1:
    p.error('need num_train, num_test >= 0, image_size >= 32 and workers >= 1')
  if args.num_train == 0 and args.num_test == 0:
    p.error('nothing to generate: --num_train and --num_test are both 0')
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.hand:
    assets = generate.load_assets(args.hand_model, hand=True)
  else:
    assets = generate.load_assets(args.body_model)
  keep = args.contact_sheet_count if args.contact_sheet else 0
  start = time.time()
  for split, num in (('train', args.num_train), ('test', args.num_test)):
    if num == 0:
      continue
    yaml_path, kept = generate.generate_split(
        assets,
        args.out,
        split,
        num,
        args.seed,
        args.image_size,
        args.workers,
        args.backend,
        progress=not args.quiet,
        keep_first=keep if split == 'train' else 0,
    )
    print(f'wrote {num} examples: {yaml_path}')
    if kept:
      sheet = generate.contact_sheet(kept, args.contact_sheet, tile=args.contact_sheet_tile or None)
      print(f'contact sheet: {sheet}')
  print(f'done in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
