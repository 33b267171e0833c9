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
import jax
import jax.numpy as jnp

from coarsemetro_jax.models import batch_norm as batch_norm_lib
from coarsemetro_jax.models import conv_ops

RESNET50_DEPTHS = (3, 4, 6, 3)
EXPANSION = 4  # Bottleneck output channels = 4 x planes.

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train, name, dtype=jnp.float32, scale_init=nn.initializers.ones):
  """nn.BatchNorm's variables and value; a shorter backward on XLA:CPU (models/batch_norm.py)."""
  return batch_norm_lib.BatchNorm(not train, 0.9, 1e-5, dtype, scale_init, name=name)


class Conv(nn.Module):
  """nn.Conv with a square kernel and PyTorch's symmetric padding, through `conv_ops.conv2d`.

  Same parameters ('kernel' [k, k, C_in, C_out], 'bias'), init and value as
  nn.Conv(features, (k, k), (stride, stride), padding=((k//2, k//2),) * 2);
  conv_ops picks a weight gradient that suits XLA:CPU where it helps.
  """

  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features] (odd kernels)
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features))
    y = conv_ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, k // 2)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def conv(features, kernel, stride, name, dtype=jnp.float32, use_bias=False):
  return Conv(features, kernel, stride, use_bias, dtype, name=name)


def _pool_windows(x):
  """The 9 strided [B, ceil(H/2), ceil(W/2), C] windows of a 3x3/2 pool over a -inf padding."""
  b, h, w, c = x.shape
  out_h, out_w = (h + 1) // 2, (w + 1) // 2
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [
      jax.lax.slice(
          padded, (0, i, j, 0), (b, i + 2 * out_h - 1, j + 2 * out_w - 1, c), (1, 2, 2, 1)
      )
      for i in range(3)
      for j in range(3)
  ]


def _max_pool_fwd(x):
  windows = _pool_windows(x)
  out, index = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
  for k, window in enumerate(windows[1:], 1):
    index = jnp.where(window > out, jnp.int8(k), index)  # first maximum wins
    out = jnp.maximum(out, window)
  return out, (index, x.shape)


def _max_pool_bwd(residuals, g):
  index, (b, h, w, c) = residuals
  out_h, out_w = g.shape[1:3]
  grad = jnp.zeros((b, h + 2, w + 2, c), g.dtype)  # w.r.t. the padded input
  zero = jnp.zeros((), g.dtype)
  for k in range(9):
    i, j = divmod(k, 3)
    # Output (y, x) read padded (i + 2y, j + 2x): interior padding puts it there.
    part = jnp.where(index == k, g, zero)  # [B, out_h, out_w, C]
    grad = grad + jax.lax.pad(
        part,
        zero,
        (
            (0, 0, 0),
            (i, h + 2 - i - 2 * out_h + 1, 1),
            (j, w + 2 - j - 2 * out_w + 1, 1),
            (0, 0, 0),
        ),
    )
  return (grad[:, 1 : h + 1, 1 : w + 1],)


@jax.custom_vjp
def max_pool_3x3_s2(x):
  """PyTorch's MaxPool2d(3, stride=2, padding=1) as the max of 9 strided slices.

  Same values as nn.max_pool over a -inf padding. The forward pass also keeps
  which of the 9 window positions won (int8, the first maximum in row-major
  order, as PyTorch and nn.max_pool); the backward pass routes the gradient
  there with 9 selects and strided pads. XLA:CPU's select-and-scatter (the
  autodiff of nn.max_pool) was about 3x slower; the autodiff of the slices
  recomputes the max for each of the 9 positions, and the embedded train step
  is about 10 % faster with this VJP than with it.
  """
  # x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]
  return _max_pool_fwd(x)[0]


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


class PointwiseConv(nn.Module):
  """1x1 convolution (no bias) as a matmul over channels; `kernel` [1, 1, C_in, C_out] as nn.Conv.

  Same parameters, init and result as `conv(features, 1, stride, ...)`, but
  XLA's CPU backend turns a 1x1 conv's weight gradient into a convolution over
  transposed [C, H, W, N] copies of the activations, and a dot's gradient into
  plain matmuls: about 2x faster forward + backward on CPU
  (benchmarks/train_step.py).
  """

  features: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # x [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features]
    kernel = self.param('kernel', conv_init, (1, 1, x.shape[-1], self.features))
    if self.stride > 1:
      x = x[:, :: self.stride, :: self.stride]
    b, h, w, c = x.shape
    # A 2-D dot: the weight gradient of a dot over [B, H, W, C] contracts
    # three dimensions, which XLA:CPU lays out as a transposed [C, B*H*W]
    # copy of the output gradient; over [B*H*W, C] it reads it in place.
    y = conv_ops.matmul(x.reshape(b * h * w, c).astype(self.dtype), kernel[0, 0].astype(self.dtype))
    return y.reshape(b, h, w, self.features)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: stride on conv2)."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32
  zero_init_residual: bool = False  # bn3 scale starts at 0 (torchvision)

  @nn.compact
  def __call__(self, x, train):
    out = nn.relu(
        batch_norm(train, 'bn1', self.dtype)(
            PointwiseConv(self.planes, dtype=self.dtype, name='conv1')(x)
        )
    )
    out = nn.relu(
        batch_norm(train, 'bn2', self.dtype)(
            conv(self.planes, 3, self.stride, 'conv2', self.dtype)(out)
        )
    )
    bn3_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out = batch_norm(train, 'bn3', self.dtype, bn3_init)(
        PointwiseConv(self.planes * EXPANSION, dtype=self.dtype, name='conv3')(out)
    )
    if self.downsample:
      x = batch_norm(train, 'downsample_1', self.dtype)(
          PointwiseConv(self.planes * EXPANSION, self.stride, self.dtype, name='downsample_0')(x)
      )
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
  # torchvision's `zero_init_residual`: each block's last BatchNorm starts at
  # scale 0, so every residual branch starts as the identity (or projection).
  zero_init_residual: bool = False
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
    x = max_pool_3x3_s2(x)
    in_channels = self.width
    for i, depth in enumerate(self.depths):
      planes = self.width * 2**i
      for j in range(depth):
        stride = 2 if (j == 0 and i > 0) else 1
        downsample = j == 0 and (stride != 1 or in_channels != planes * EXPANSION)
        x = block_cls(
            planes,
            stride,
            downsample,
            self.dtype,
            self.zero_init_residual,
            name=f'layer{i + 1}_{j}',
        )(x, train)
        in_channels = planes * EXPANSION
    return x


ResNet50 = functools.partial(ResNet, depths=RESNET50_DEPTHS, width=64)
