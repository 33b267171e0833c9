"""torchvision-layout ResNet (Bottleneck, v1.5: stride on the 3x3 conv), by hand.

Children are registered in torchvision's order (conv1, bn1, relu, maxpool,
layer1-4, avgpool, fc) so that FastMETRO's `nn.Sequential(*children()[:-2])`
gives the `backbone.0/.1/.4-.7` keys.
"""

import torch
from torch import nn

EXPANSION = 4


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 with an optional projection shortcut."""

  def __init__(self, in_channels, planes, stride=1, downsample=False):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if downsample:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_channels, planes * EXPANSION, 1, stride, bias=False),
          nn.BatchNorm2d(planes * EXPANSION),
      )

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """ResNet with classifier; depths (3, 4, 6, 3), width 64 = ResNet-50."""

  def __init__(self, depths=(3, 4, 6, 3), width=64, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, padding=1)
    in_channels = width
    for i, depth in enumerate(depths):
      planes = width * 2**i
      blocks = []
      for j in range(depth):
        stride = 2 if (j == 0 and i > 0) else 1
        downsample = j == 0 and (stride != 1 or in_channels != planes * EXPANSION)
        blocks.append(Bottleneck(in_channels, planes, stride, downsample))
        in_channels = planes * EXPANSION
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(in_channels, num_classes)
    self.out_channels = in_channels

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def trunk(resnet):
  """FastMETRO's backbone: the ResNet without avgpool and fc."""
  return nn.Sequential(*list(resnet.children())[:-2])
