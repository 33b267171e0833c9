"""FastMETRO-{S,M,L} baselines (released-code layout), e.g. for converted checkpoints.

  python main.py --config=configs/fastmetro.py:S-r50 --workdir=runs/fastmetro_s \
      --config.data.train_yaml=... --config.data.eval_yaml=... (as configs/r50.py)
  python main.py --config=configs/fastmetro.py:L-h64 --workdir=runs/fastmetro_l_h64 \
      --mode=eval --config.init_from=runs/converted/FastMETRO-L-H64_h36m ...

The argument is '<size>-<backbone>': size S/M/L = 1/2/3 layers per transformer,
backbone r50 (ResNet-50) or h64 (HRNet-W64). Paper (FastMETRO, Human3.6M
PA-MPJPE): S-R50 39.4, M-R50 38.6, L-R50 37.3, L-H64 33.7. The training
settings are configs/r50.py's, which follow FastMETRO's released training.
"""

from configs import r50

SIZES = {'S': 1, 'M': 2, 'L': 3}
BACKBONES = {
    'r50': ('resnet50', 64),
    'h64': ('hrnet', 64),
    'h48': ('hrnet', 48),
    'h32': ('hrnet', 32),
}


def get_config(arg='S-r50'):
  """FastMETRO recipe; `arg` picks size and backbone."""
  size, _, backbone = arg.partition('-')
  if size not in SIZES or backbone not in BACKBONES:
    raise ValueError(
        f"configs/fastmetro.py argument must be '<S|M|L>-<{'|'.join(BACKBONES)}>', " f'got {arg!r}'
    )
  config = r50.get_config()
  config.model.name = 'fastmetro'
  config.model.fastmetro_layers = SIZES[size]
  config.model.backbone, config.model.hrnet_width = BACKBONES[backbone]
  # FastMETRO's released training adds the edge-length/normal losses.
  config.loss.use_edge_normal = True
  return config
