"""HRNet's modules (HRNet-Image-Classification / METRO `get_cls_net`), in state-dict order.

`module_rows` lists every PyTorch module with its row kind; `tables.py` turns
the listing into the conversion table (`tables.hrnet_backbone_table`), used for
the ImageNet files (`hrnetv2_w64_imagenet_pretrained.pth`: torch prefix '') and
for the backbone of FastMETRO-*-H64 / CoarseMETRO-S-H64 (torch prefix
'backbone.'). Every module maps to the Flax path given by `tables.flax_name`
(models/hrnet.py names its submodules that way). The `classifier` (Linear
2048 -> 1000) is in every such state dict but unused by FastMETRO, so it is
ignored; `incre_modules`, `downsamp_modules` and `final_layer` produce the
2048-channel map FastMETRO uses and are converted.

W64: 1954 converted keys (1956 with the classifier), 126,010,944 parameters
(128,059,944 with the classifier).
"""

from coarsemetro_jax.models import hrnet

EXPANSION = 4


def _bottleneck(rows, module, downsample):
  for k in (1, 2, 3):
    rows += [(f'{module}.conv{k}', 'conv'), (f'{module}.bn{k}', 'batch_norm')]
  if downsample:
    rows += [(f'{module}.downsample.0', 'conv'), (f'{module}.downsample.1', 'batch_norm')]


def _conv_bn(rows, module, kind='conv'):
  rows += [(f'{module}.0', kind), (f'{module}.1', 'batch_norm')]


def _hr_module(rows, module, num_branches, num_blocks):
  """One HighResolutionModule: branches.b.k BasicBlocks, then fuse_layers.i.j."""
  for b in range(num_branches):
    for k in range(num_blocks):
      p = f'{module}.branches.{b}.{k}'
      rows += [
          (f'{p}.conv1', 'conv'),
          (f'{p}.bn1', 'batch_norm'),
          (f'{p}.conv2', 'conv'),
          (f'{p}.bn2', 'batch_norm'),
      ]
  for i in range(num_branches):
    for j in range(num_branches):
      p = f'{module}.fuse_layers.{i}.{j}'
      if j > i:
        _conv_bn(rows, p)
      for k in range(i - j):
        _conv_bn(rows, f'{p}.{k}')


def module_rows(
    width,
    stem_width=64,
    stage_modules=hrnet.STAGE_MODULES,
    num_blocks=hrnet.NUM_BLOCKS,
    head_channels=hrnet.HEAD_CHANNELS,
    final_channels=hrnet.FINAL_CHANNELS,
):
  """(torch module path, row kind) in state-dict order, for models/hrnet.HRNet's fields."""
  del final_channels  # a shape only; the rows are the same
  rows = [('conv1', 'conv'), ('bn1', 'batch_norm'), ('conv2', 'conv'), ('bn2', 'batch_norm')]
  for j in range(num_blocks):
    _bottleneck(rows, f'layer1.{j}', j == 0)
  channels = (stem_width * EXPANSION,)
  for s, num_modules in enumerate(stage_modules):
    new = tuple(width * 2**b for b in range(len(channels) + 1))
    for i, c in enumerate(new):
      if i >= len(channels):
        _conv_bn(rows, f'transition{s + 1}.{i}.0')
      elif c != channels[i]:
        _conv_bn(rows, f'transition{s + 1}.{i}')
    channels = new
    for m in range(num_modules):
      _hr_module(rows, f'stage{s + 2}.{m}', len(channels), num_blocks)
  for i, c in enumerate(channels):
    _bottleneck(rows, f'incre_modules.{i}.0', c != head_channels[i] * EXPANSION)
  for i in range(len(channels) - 1):
    _conv_bn(rows, f'downsamp_modules.{i}', 'conv_bias')
  _conv_bn(rows, 'final_layer', 'conv_bias')
  return rows
