"""ResNet (torchvision v1.5 layout) as a feature extractor: [B, H, W, 3] -> [B, H/32, W/32, C].

Names mirror torchvision's state dict (`layer1.0.conv1.weight` ->
`layer1_0/conv1/kernel`), the stride sits on the 3x3 conv (v1.5), and every
convolution pads explicitly and symmetrically as PyTorch does (Flax's 'SAME'
pads (0, 1) for stride 2 on even inputs, which would break checkpoint parity).

BatchNorm keeps running statistics in `batch_stats` (momentum 0.9 = PyTorch's
0.1, eps 1e-5). Under `jax.jit` with the batch sharded over the 'data' axis the
batch statistics are computed over the *global* batch, i.e. synchronised
BatchNorm; PyTorch FastMETRO used per-GPU statistics (see steps.py).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

RESNET50_DEPTHS = (3, 4, 6, 3)
EXPANSION = 4  # Bottleneck output channels = 4 x planes.

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train, name, dtype=jnp.float32):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def conv(features, kernel, stride, name, dtype=jnp.float32, use_bias=False):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 kernel_init=conv_init, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: stride on conv2)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    out = nn.relu(batch_norm(train, 'bn1', self.dtype)(
        conv(self.planes, 1, 1, 'conv1', self.dtype)(x)))
    out = nn.relu(batch_norm(train, 'bn2', self.dtype)(
        conv(self.planes, 3, self.stride, 'conv2', self.dtype)(out)))
    out = batch_norm(train, 'bn3', self.dtype)(
        conv(self.planes * EXPANSION, 1, 1, 'conv3', self.dtype)(out))
    if self.downsample:
      x = batch_norm(train, 'downsample_1', self.dtype)(
          conv(self.planes * EXPANSION, 1, self.stride, 'downsample_0', self.dtype)(x))
    return nn.relu(out + x)


class ResNet(nn.Module):
  """ResNet trunk without avgpool/fc (FastMETRO's `children()[:-2]`).

  depths=(3, 4, 6, 3), width=64 is ResNet-50: 23,508,032 parameters, a
  [B, 7, 7, 2048] map for a 224 input. Smaller depths/width give the CPU-sized
  backbones of configs/tiny.py and the embedded default.
  """
  depths: tuple[int, ...] = RESNET50_DEPTHS
  width: int = 64
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @property
  def out_channels(self):
    return self.width * 2 ** (len(self.depths) - 1) * EXPANSION

  @nn.compact
  def __call__(self, x, train=False):
    # x [B, H, W, 3] -> [B, H/32, W/32, out_channels]
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    x = conv(self.width, 7, 2, 'conv1', self.dtype)(x.astype(self.dtype))
    x = nn.relu(batch_norm(train, 'bn1', self.dtype)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    in_channels = self.width
    for i, depth in enumerate(self.depths):
      planes = self.width * 2 ** i
      for j in range(depth):
        stride = 2 if (j == 0 and i > 0) else 1
        downsample = j == 0 and (stride != 1 or in_channels != planes * EXPANSION)
        x = block_cls(planes, stride, downsample, self.dtype,
                      name=f'layer{i + 1}_{j}')(x, train)
        in_channels = planes * EXPANSION
    return x


ResNet50 = functools.partial(ResNet, depths=RESNET50_DEPTHS, width=64)
