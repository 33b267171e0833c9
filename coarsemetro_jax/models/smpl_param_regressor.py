"""FastMETRO's optional SMPL-parameter regressor (GraphCMR-style), in Flax.

The released PyTorch module, attribute `smpl_parameter_regressor` of
`FastMETRO_Body_Network`, reads the intermediate mesh [B, 1723, 3], detached
and flattened to 5169 values, through

  regressor.0      Linear 5169 -> 1024, BatchNorm1d, ReLU     (fc_block.0/.1)
  regressor.1, .2  relu(x + BN(Linear(relu(BN(Linear(x))))))  (fc_block.0/.1/.3/.4)
  regressor.3      Linear 1024 -> 226

The first 216 outputs are 24 raw 3x3 matrices, each projected to a rotation
(`svd_rotation`); the last 10 are the SMPL betas. Submodules are named after
the PyTorch attributes with `tables.flax_name`'s rule (`regressor.0.fc_block.1`
-> `regressor_0/fc_block_1`), so conversion is a table
(convert/smpl_param_table.py). 9,734,370 parameters.

BatchNorm follows PyTorch's BatchNorm1d exactly (`BatchNorm1d` below), the
unbiased running variance included: with batches of 16 the biased variance
that Flax's nn.BatchNorm tracks would be 6 % too small.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from coarsemetro_jax import joints
from coarsemetro_jax.models import transformer as tfm

NUM_INPUT_VERTICES = 1723
HIDDEN = 1024
NUM_ROTATIONS = joints.NUM_SMPL_JOINTS  # 24
NUM_BETAS = joints.NUM_BETAS  # 10
NUM_OUTPUTS = NUM_ROTATIONS * 9 + NUM_BETAS  # 226


class BatchNorm1d(nn.Module):
  """PyTorch's BatchNorm1d on [B, C]: `scale`/`bias` params, `mean`/`var` batch_stats.

  Train mode normalises with the batch mean and the biased batch variance and
  moves the running statistics by `momentum` towards the batch mean and the
  *unbiased* batch variance (x n / (n - 1)), as PyTorch does. Under `jax.jit`
  with a batch sharded over devices the batch is the global one (synchronised
  BatchNorm); FastMETRO's DDP used per-GPU statistics.
  """

  momentum: float = 0.9  # Flax convention: weight of the old value (PyTorch's 0.1)
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train):
    # x [B, C] -> [B, C]
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if train:
      n = x.shape[0]
      if n < 2:
        raise ValueError(f'BatchNorm1d in train mode needs a batch of at least 2, got {n}')
      mean = x.mean(0)
      var = jnp.square(x - mean).mean(0)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * var * (n / (n - 1))
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class FCBlock(nn.Module):
  """Linear, BatchNorm1d, ReLU (PyTorch `fc_block.0/.1/.2`)."""

  features: int

  @nn.compact
  def __call__(self, x, train):
    x = tfm.TorchDense(self.features, name='fc_block_0')(x)
    return nn.relu(BatchNorm1d(name='fc_block_1')(x, train))


class FCResBlock(nn.Module):
  """relu(x + BN(Linear(relu(BN(Linear(x)))))) (PyTorch `fc_block.0/.1/.3/.4`)."""

  @nn.compact
  def __call__(self, x, train):
    features = x.shape[-1]
    y = tfm.TorchDense(features, name='fc_block_0')(x)
    y = nn.relu(BatchNorm1d(name='fc_block_1')(y, train))
    y = tfm.TorchDense(features, name='fc_block_3')(y)
    y = BatchNorm1d(name='fc_block_4')(y, train)
    return nn.relu(x + y)


def svd_rotation(matrices):
  """Raw 3x3 matrices [..., 3, 3] -> rotations [..., 3, 3] (det +1).

  U V^T of the SVD (the nearest orthogonal matrix), multiplied by the sign of
  its determinant: a reflection (det -1) becomes -U V^T, which has det +1.
  This is the released code's projection (it multiplies by the determinant
  computed without gradient, which is +-1 up to rounding); it is not the
  nearest rotation when det(U V^T) = -1.
  """
  u, _, vh = jnp.linalg.svd(matrices.astype(jnp.float32), full_matrices=False)
  r = jnp.matmul(u, vh, precision=jax.lax.Precision.HIGHEST)
  sign = jnp.where(jnp.linalg.det(jax.lax.stop_gradient(r)) < 0, -1.0, 1.0)
  return r * sign[..., None, None]


class SMPLParamRegressor(nn.Module):
  """Intermediate mesh -> SMPL pose (rotation matrices) and shape.

  Use as `SMPLParamRegressor(name='smpl_parameter_regressor')` inside the
  network so that the Flax paths follow the PyTorch keys.
  """

  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, vertices, train=False):
    """vertices [B, 1723, 3] -> {'pred_rotmat' [B, 24, 3, 3], 'pred_betas' [B, 10]}.

    The mesh is detached (stop_gradient): the regressor's loss does not reach
    the network that predicts the mesh.
    """
    b = vertices.shape[0]
    x = jax.lax.stop_gradient(vertices).astype(jnp.float32).reshape(b, -1)  # [B, 5169]
    x = FCBlock(self.hidden, name='regressor_0')(x, train)
    x = FCResBlock(name='regressor_1')(x, train)
    x = FCResBlock(name='regressor_2')(x, train)
    x = tfm.TorchDense(NUM_OUTPUTS, name='regressor_3')(x)  # [B, 226]
    raw = x[:, : NUM_ROTATIONS * 9].reshape(b, NUM_ROTATIONS, 3, 3)
    return {'pred_rotmat': svd_rotation(raw), 'pred_betas': x[:, NUM_ROTATIONS * 9 :]}
