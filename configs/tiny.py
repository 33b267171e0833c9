"""CPU-sized CoarseMETRO for tests and smoke runs (import-and-override of r50).

  python main.py --config=configs/tiny.py --workdir=/tmp/tiny

Same code paths as the paper recipe, with a 1-block-per-stage ResNet of width 8
(256 output channels), 64 x 64 inputs (a 2 x 2 token grid) and narrow stages.
Pass ':fastmetro' for the FastMETRO-S structure at the same size.
"""

from configs import r50


def get_config(arg='coarsemetro'):
  """Tiny widths/depths; `arg` = 'coarsemetro' or 'fastmetro'."""
  if arg not in ('coarsemetro', 'fastmetro'):
    raise ValueError(f"configs/tiny.py argument must be 'coarsemetro' or 'fastmetro', got {arg!r}")
  config = r50.get_config()
  # Small enough that tests build, step and evaluate it in seconds on a CPU.
  config.model.name = arg
  config.model.backbone = 'resnet'
  config.model.resnet_depths = (1, 1, 1, 1)
  config.model.resnet_width = 8
  config.model.num_heads = 4
  config.model.stage_dims = (32, 16, 16)
  config.model.stage_ffn_dims = (64, 32, 32)
  config.model.fastmetro_dims = (32, 16)
  config.model.fastmetro_ffn_dims = (64, 32)
  config.data.source = 'synthetic'
  config.data.image_size = 64
  # Evaluation crops 'continuous' like training: the synthetic data's convention.
  config.data.crop = 'continuous'
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.num_epochs = 1
  return config
