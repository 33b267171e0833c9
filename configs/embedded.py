"""The embedded default: CoarseMETRO on the synthetic CC0-body data, sized for a 2-core CPU.

  python main.py --config=configs/embedded.py --workdir=runs/embedded

The README's first command. On first use it renders the embedded dataset
(data_pipelines/synthetic, METRO TSV format) into `data.synthetic.dir`, then
trains and evaluates through the same code path as the paper recipe
(configs/r50.py): same model structure (three coarse-to-fine stages, 48/192/384
vertex tokens, learned and fixed up-sampling), losses, metrics and checkpoints,
with a narrow ResNet, small crops and narrow stages so that it finishes in
about 15 minutes on 2 CPU cores. The final evaluation prints MPJPE / PA-MPJPE /
MPVE on the held-out split next to a mean-pose baseline, and writes a picture of
predicted meshes over test images into the workdir.
"""

from configs import r50


def get_config():
  """CPU-sized CoarseMETRO on the embedded data."""
  config = r50.get_config()
  config.model.backbone = 'resnet'
  config.model.resnet_depths = (1, 1, 1, 1)
  config.model.resnet_width = 16           # 512 output channels
  config.model.num_heads = 4
  config.model.stage_dims = (128, 64, 32)
  config.model.stage_ffn_dims = (256, 128, 64)
  config.model.dropout = 0.0               # ~5 epochs: nothing to regularise yet

  config.data.image_size = 96              # a 3 x 3 token grid
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.synthetic.num_train = 10_000
  config.data.synthetic.num_test = 1_000
  config.data.synthetic.image_size = 128   # stored crops; decoded every step
  config.data.rot_factor = 0.0             # the renders already roll and pitch

  # From scratch (no ImageNet weights on a fresh machine): a larger lr with one
  # StepLR drop after 4 epochs (312 steps each); BN over the batch.
  config.optim.lr = 1e-3
  config.optim.lr_drop_epochs = 4
  config.bn_group_size = 0
  config.num_train_steps = 1_500
  config.log_every_steps = 100
  config.eval_every_steps = 500
  config.eval_max_batches = 4
  config.checkpoint_every_steps = 500
  config.num_eval_images = 8
  return config
