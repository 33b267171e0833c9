"""HRNet classification network (METRO/FastMETRO `get_cls_net` layout), by hand.

Same module tree and registration order as METRO's `HighResolutionNet`
(FastMETRO's HRNet backbone), so `state_dict()` keys are the checkpoint keys
(`stage3.0.fuse_layers.2.0.1.0.weight`, `incre_modules.1.0.downsample.1.*`,
`classifier.weight`, ...). `forward` returns the 2048-channel map before
pooling, as FastMETRO's backbone does; `classifier` is registered, never run.
The structure arguments mirror models/hrnet.HRNet's fields.
"""

import torch
from torch import nn

from torch_reference import resnet

EXPANSION = resnet.EXPANSION


def conv_bn(cin, cout, kernel, stride, relu, bias=False):
  layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout)]
  return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class BasicBlock(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.bn2(self.conv2(out)) + x)


class HighResolutionModule(nn.Module):
  """branches (ModuleList of Sequential BasicBlocks) + fuse_layers[i][j] (None if i == j)."""

  def __init__(self, channels, num_blocks):
    super().__init__()
    n = len(channels)
    self.branches = nn.ModuleList(
        nn.Sequential(*[BasicBlock(c) for _ in range(num_blocks)]) for c in channels
    )
    fuse_layers = []
    for i in range(n):
      row = []
      for j in range(n):
        if j > i:
          row.append(
              nn.Sequential(
                  nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                  nn.BatchNorm2d(channels[i]),
                  nn.Upsample(scale_factor=2 ** (j - i), mode='nearest'),
              )
          )
        elif j == i:
          row.append(None)
        else:
          row.append(
              nn.Sequential(
                  *[
                      conv_bn(
                          channels[j],
                          channels[i] if k == i - j - 1 else channels[j],
                          3,
                          2,
                          relu=k < i - j - 1,
                      )
                      for k in range(i - j)
                  ]
              )
          )
      fuse_layers.append(nn.ModuleList(row))
    self.fuse_layers = nn.ModuleList(fuse_layers)

  def forward(self, xs):
    xs = [branch(x) for branch, x in zip(self.branches, xs)]
    outs = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[i]
      for j, layer in enumerate(row):
        if j != i:
          y = y + layer(xs[j])
      outs.append(torch.relu(y))
    return outs


def _transition(in_channels, out_channels):
  layers = []
  for i, c in enumerate(out_channels):
    if i < len(in_channels):
      layers.append(conv_bn(in_channels[i], c, 3, 1, relu=True) if c != in_channels[i] else None)
    else:
      layers.append(nn.Sequential(conv_bn(in_channels[-1], c, 3, 2, relu=True)))
  return nn.ModuleList(layers)


class HRNet(nn.Module):
  """width 64 = HRNet-W64 (1956 state-dict keys, 128,059,944 parameters)."""

  def __init__(
      self,
      width=64,
      stem_width=64,
      stage_modules=(1, 4, 3),
      num_blocks=4,
      head_channels=(32, 64, 128, 256),
      final_channels=2048,
      num_classes=1000,
  ):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem_width, 3, 2, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem_width)
    self.conv2 = nn.Conv2d(stem_width, stem_width, 3, 2, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(stem_width)
    self.layer1 = nn.Sequential(
        *[
            resnet.Bottleneck(
                stem_width if j == 0 else stem_width * EXPANSION, stem_width, downsample=j == 0
            )
            for j in range(num_blocks)
        ]
    )
    channels = [stem_width * EXPANSION]
    for s, num_modules in enumerate(stage_modules):
      new = [width * 2**b for b in range(len(channels) + 1)]
      setattr(self, f'transition{s + 1}', _transition(channels, new))
      channels = new
      setattr(
          self,
          f'stage{s + 2}',
          nn.Sequential(  # lists in, lists out
              *[HighResolutionModule(channels, num_blocks) for _ in range(num_modules)]
          ),
      )
    self.incre_modules = nn.ModuleList(
        nn.Sequential(resnet.Bottleneck(c, h, downsample=c != h * EXPANSION))
        for c, h in zip(channels, head_channels)
    )
    self.downsamp_modules = nn.ModuleList(
        conv_bn(
            head_channels[i] * EXPANSION,
            head_channels[i + 1] * EXPANSION,
            3,
            2,
            relu=True,
            bias=True,
        )
        for i in range(len(channels) - 1)
    )
    self.final_layer = conv_bn(
        head_channels[-1] * EXPANSION, final_channels, 1, 1, relu=True, bias=True
    )
    self.classifier = nn.Linear(final_channels, num_classes)
    self.num_stages = len(stage_modules)
    self.out_channels = final_channels

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.bn2(self.conv2(x)))
    xs = [self.layer1(x)]
    for s in range(self.num_stages):
      transition = getattr(self, f'transition{s + 1}')
      xs = [
          xs[i] if t is None else t(xs[i] if i < len(xs) else xs[-1])
          for i, t in enumerate(transition)
      ]
      xs = getattr(self, f'stage{s + 2}')(xs)
    y = self.incre_modules[0](xs[0])
    for i, down in enumerate(self.downsamp_modules):
      y = self.incre_modules[i + 1](xs[i + 1]) + down(y)
    return self.final_layer(y)  # [B, 2048, H/32, W/32]
