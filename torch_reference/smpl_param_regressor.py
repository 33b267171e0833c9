"""FastMETRO's optional SMPL-parameter regressor in PyTorch, written from its description.

Attribute `smpl_parameter_regressor` of `FastMETRO_Body_Network`; its 37
state-dict keys, under `smpl_parameter_regressor.`:

  regressor.0.fc_block.0.{weight [1024, 5169], bias}    Linear
  regressor.0.fc_block.1.{weight, bias, running_mean, running_var, num_batches_tracked}
  regressor.k.fc_block.{0,3}.{weight [1024, 1024], bias}           k = 1, 2
  regressor.k.fc_block.{1,4}.{weight, bias, running_mean, running_var, num_batches_tracked}
  regressor.3.{weight [226, 1024], bias}

Forward: the mesh [B, 1723, 3], detached and flattened, through the
Sequential; outputs 0..215 are 24 raw 3x3 matrices projected to rotations
(U V^T of the SVD times its determinant, which is +-1), 216..225 the betas.
"""

import torch
from torch import nn
from torch.nn import functional as F


class FCBlock(nn.Module):
  """fc_block = Sequential(Linear, BatchNorm1d, ReLU)."""

  def __init__(self, in_size, out_size):
    super().__init__()
    self.fc_block = nn.Sequential(nn.Linear(in_size, out_size), nn.BatchNorm1d(out_size), nn.ReLU())

  def forward(self, x):
    return self.fc_block(x)


class FCResBlock(nn.Module):
  """relu(x + fc_block(x)), fc_block = Sequential(Linear, BN, ReLU, Linear, BN)."""

  def __init__(self, size):
    super().__init__()
    self.fc_block = nn.Sequential(
        nn.Linear(size, size),
        nn.BatchNorm1d(size),
        nn.ReLU(),
        nn.Linear(size, size),
        nn.BatchNorm1d(size),
    )

  def forward(self, x):
    return F.relu(x + self.fc_block(x))


def svd_rotation(matrices):
  """[N, 3, 3] -> U V^T times det(U V^T) (the determinant taken without gradient)."""
  u, _, vh = torch.linalg.svd(matrices)
  r = u @ vh
  with torch.no_grad():
    det = torch.linalg.det(r)
  return r * det[:, None, None]


class SMPLParameterRegressor(nn.Module):
  """Intermediate mesh [B, 1723, 3] -> (rotmat [B, 24, 3, 3], betas [B, 10])."""

  def __init__(self, num_vertices=1723, hidden=1024):
    super().__init__()
    self.regressor = nn.Sequential(
        FCBlock(num_vertices * 3, hidden),
        FCResBlock(hidden),
        FCResBlock(hidden),
        nn.Linear(hidden, 24 * 9 + 10),
    )

  def forward(self, vertices):
    b = vertices.shape[0]
    x = self.regressor(vertices.detach().reshape(b, -1))
    rotmat = svd_rotation(x[:, : 24 * 9].reshape(-1, 3, 3)).reshape(b, 24, 3, 3)
    return rotmat, x[:, 24 * 9 :]
