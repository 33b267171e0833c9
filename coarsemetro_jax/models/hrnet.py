"""HRNet-W{32,48,64} (HRNet-Image-Classification) as a feature extractor.

[B, H, W, 3] -> [B, H/32, W/32, 2048]: the classification network without its
classifier, exactly as FastMETRO/METRO's `hrnet_cls_net_featmaps.py` runs it:

  stem      conv1 3x3/s2 + bn1 + ReLU, conv2 3x3/s2 + bn2 + ReLU    (64 ch, H/4)
  layer1    4 Bottlenecks, 64 -> 256 ch
  stage2-4  1 / 4 / 3 HighResolutionModules with 2 / 3 / 4 branches of
            C, 2C, 4C, 8C channels (C = width) at H/4 ... H/32; each branch is
            4 BasicBlocks, then every output resolution sums all branches
            (fuse_layers) and applies ReLU
  head      incre_modules (one Bottleneck per branch, -> 128/256/512/1024 ch),
            downsamp_modules (3x3/s2 conv with bias + BN + ReLU, summed from
            fine to coarse), final_layer (1x1 conv with bias 1024 -> 2048 + BN
            + ReLU)

Transitions before stages 2-4 add the new, coarser branch with a 3x3/s2 conv
from the previous coarsest output (and, before stage 2 only, adapt layer1's
256 channels to C with a 3x3 conv). Fuse up-paths are 1x1 conv + BN +
nearest up-sampling by 2^(j-i); down-paths are chains of 3x3/s2 conv + BN
(+ ReLU except the last).

Submodule names are the PyTorch state-dict paths with numeric components
joined by '_' (`stage3.2.fuse_layers.2.0.1.0.weight` ->
`stage3_2/fuse_layers_2_0_1_0/kernel`, convert/tables.flax_name), so the
conversion table (convert/hrnet_table.py) is a plain listing. The classifier
(Linear 2048 -> 1000) is in the PyTorch state dict but never used; it has no
Flax counterpart. W64 has 126,010,944 parameters here, 128,059,944 with the
classifier, and 28.96 GFLOPs at 224 px (as counted by coarsemetro_jax.profile;
HRNet-W64-C publishes 28.97G). tests/test_hrnet.py checks the outputs against
a PyTorch HRNet (W64 at 224 px with COARSEMETRO_W64_PARITY=1). Convolutions
pad explicitly and symmetrically, BatchNorm uses momentum 0.9 / eps 1e-5
(models/resnet.py).

The structural knobs beyond `width` (stem_width, stage_modules, num_blocks,
head_channels, final_channels) exist for CPU-sized test variants; the HRNet
classification checkpoints all use the defaults.
"""

import flax.linen as nn
import jax.numpy as jnp

from coarsemetro_jax.models import resnet

STAGE_MODULES = (1, 4, 3)  # HighResolutionModules in stages 2, 3, 4
NUM_BLOCKS = 4  # layer1 Bottlenecks and BasicBlocks per branch
HEAD_CHANNELS = (32, 64, 128, 256)  # incre_modules Bottleneck planes (x4 out)
FINAL_CHANNELS = 2048

conv = resnet.conv
batch_norm = resnet.batch_norm


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity shortcut (in == out channels in HRNet)."""

  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    out = nn.relu(
        batch_norm(train, 'bn1', self.dtype)(conv(self.channels, 3, 1, 'conv1', self.dtype)(x))
    )
    out = batch_norm(train, 'bn2', self.dtype)(conv(self.channels, 3, 1, 'conv2', self.dtype)(out))
    return nn.relu(out + x)


def upsample_nearest(x, factor):
  """nn.Upsample(scale_factor=factor, mode='nearest'). [B,h,w,C] -> [B,fh,fw,C]."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


class HighResolutionModule(nn.Module):
  """Parallel branches of BasicBlocks, then the SUM fuse at every resolution."""

  channels: tuple[int, ...]  # per branch, fine to coarse
  num_blocks: int = NUM_BLOCKS
  dtype: jnp.dtype = jnp.float32

  def fuse(self, x, i, j, train):
    """Branch j's output [B, h_j, w_j, C_j] brought to branch i's resolution/width."""
    name = f'fuse_layers_{i}_{j}'
    if j > i:  # coarser: 1x1 conv + BN + nearest up-sampling
      x = batch_norm(train, f'{name}_1', self.dtype)(
          conv(self.channels[i], 1, 1, f'{name}_0', self.dtype)(x)
      )
      return upsample_nearest(x, 2 ** (j - i))
    for k in range(i - j):  # finer: (i - j) 3x3/s2 convs, ReLU between them
      last = k == i - j - 1
      x = conv(self.channels[i] if last else self.channels[j], 3, 2, f'{name}_{k}_0', self.dtype)(x)
      x = batch_norm(train, f'{name}_{k}_1', self.dtype)(x)
      if not last:
        x = nn.relu(x)
    return x

  @nn.compact
  def __call__(self, xs, train):
    # xs: tuple of [B, H/2^b, W/2^b, C_b] -> the same shapes.
    ys = []
    for b, x in enumerate(xs):
      for k in range(self.num_blocks):
        x = BasicBlock(self.channels[b], self.dtype, name=f'branches_{b}_{k}')(x, train)
      ys.append(x)
    outs = []
    for i in range(len(ys)):
      y = ys[i]
      for j in range(len(ys)):
        if j != i:
          y = y + self.fuse(ys[j], i, j, train)
      outs.append(nn.relu(y))
    return tuple(outs)


class HRNet(nn.Module):
  """HRNet classification trunk + head without the classifier: [B,H,W,3] -> [B,H/32,W/32,2048].

  `remat` rematerialises every HighResolutionModule and Bottleneck (their
  inputs are kept, everything inside is recomputed in the backward pass).
  """

  width: int = 64
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  stem_width: int = 64
  stage_modules: tuple[int, ...] = STAGE_MODULES
  num_blocks: int = NUM_BLOCKS
  head_channels: tuple[int, ...] = HEAD_CHANNELS
  final_channels: int = FINAL_CHANNELS

  @property
  def out_channels(self):
    return self.final_channels

  def branch_channels(self, num_branches):
    return tuple(self.width * 2**b for b in range(num_branches))

  def transition(self, xs, in_channels, out_channels, stage, train):
    """transition{stage}: adapt widths, add one coarser branch from the last output."""
    new = []
    for i, c in enumerate(out_channels):
      name = f'transition{stage}_{i}'
      if i < len(in_channels):
        x = xs[i]
        if c != in_channels[i]:
          x = nn.relu(
              batch_norm(train, f'{name}_1', self.dtype)(conv(c, 3, 1, f'{name}_0', self.dtype)(x))
          )
      else:
        x = nn.relu(
            batch_norm(train, f'{name}_0_1', self.dtype)(
                conv(c, 3, 2, f'{name}_0_0', self.dtype)(xs[-1])
            )
        )
      new.append(x)
    return tuple(new)

  @nn.compact
  def __call__(self, x, train=False):
    # x [B, H, W, 3] -> [B, H/32, W/32, final_channels]
    bottleneck = (
        nn.remat(resnet.Bottleneck, static_argnums=(2,)) if self.remat else resnet.Bottleneck
    )
    hr_module = (
        nn.remat(HighResolutionModule, static_argnums=(2,)) if self.remat else HighResolutionModule
    )
    x = x.astype(self.dtype)
    x = nn.relu(
        batch_norm(train, 'bn1', self.dtype)(conv(self.stem_width, 3, 2, 'conv1', self.dtype)(x))
    )  # [B, H/2, W/2, 64]
    x = nn.relu(
        batch_norm(train, 'bn2', self.dtype)(conv(self.stem_width, 3, 2, 'conv2', self.dtype)(x))
    )  # [B, H/4, W/4, 64]
    for j in range(self.num_blocks):
      x = bottleneck(self.stem_width, 1, j == 0, self.dtype, name=f'layer1_{j}')(x, train)
    xs, channels = (x,), (self.stem_width * resnet.EXPANSION,)  # [B, H/4, W/4, 256]

    for s, num_modules in enumerate(self.stage_modules):
      new_channels = self.branch_channels(len(channels) + 1)
      xs = self.transition(xs, channels, new_channels, s + 1, train)
      channels = new_channels
      for m in range(num_modules):
        xs = hr_module(channels, self.num_blocks, self.dtype, name=f'stage{s + 2}_{m}')(
            xs, train
        )  # [B, H/2^(b+2), ., C_b]

    # Classification head up to the 7x7x2048 map (no pooling, no classifier).
    head = self.head_channels
    y = None
    for i, x in enumerate(xs):
      planes = head[i]
      x = bottleneck(
          planes,
          1,
          channels[i] != planes * resnet.EXPANSION,
          self.dtype,
          name=f'incre_modules_{i}_0',
      )(
          x, train
      )  # [B, ., ., 4 head_i]
      if y is not None:
        name = f'downsamp_modules_{i - 1}'
        y = conv(planes * resnet.EXPANSION, 3, 2, f'{name}_0', self.dtype, use_bias=True)(y)
        x = x + nn.relu(batch_norm(train, f'{name}_1', self.dtype)(y))
      y = x
    y = conv(self.final_channels, 1, 1, 'final_layer_0', self.dtype, use_bias=True)(y)
    return nn.relu(batch_norm(train, 'final_layer_1', self.dtype)(y))  # [B, H/32, W/32, 2048]
