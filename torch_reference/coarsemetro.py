"""CoarseMETRO in PyTorch with the key layout of coarsemetro_jax/convert/tables.py.

Follows the Flax model (models/coarsemetro.py) in eval mode: learned cam and
joint tokens, vertex tokens initialised by a token-axis linear map from the
joints, S one-layer stages with width reduction and token up-sampling between
them, the vertex cross-attention to the previous-resolution tokens, shared
xyz regressor, last up-sampling to the coarse mesh, then FastMETRO's mesh
up-sampling. (Joint-token masking is a training-only augmentation.)
With `hand`, CoarseMETRO-Hand: the coarse mesh is the hand's 195 vertices and
goes to 778 through the fixed up-sampling alone, as FastMETRO_Hand_Network
(no `coarse2intermediate_upsample`).
"""

import torch
from torch import nn

from torch_reference import fastmetro
from torch_reference import fastmetro_hand


class TokenLinear(nn.Linear):
  """nn.Linear applied along the token axis of [B, N, C]."""

  def forward(self, x):
    return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CoarseMETRO(nn.Module):
  """CoarseMETRO-S body network."""

  def __init__(
      self,
      backbone,
      backbone_channels,
      num_vertices,
      fine_upsample,
      stage_dims=(512, 128, 64),
      stage_ffn_dims=(2048, 512, 256),
      vertex_tokens=(48, 192, 384),
      heads=8,
      vertex_attention='end',
      memory_includes_cam=True,
      num_joints=14,
      dropout=0.1,
      hand=False,
  ):
    super().__init__()
    self.num_joints = num_joints
    self.hand = hand
    self.stage_dims = stage_dims
    self.vertex_attention = vertex_attention
    d = stage_dims[0]
    self.backbone = backbone
    self.conv_1x1 = nn.Conv2d(backbone_channels, d, 1)
    self.cam_token_embed = nn.Embedding(1, d)
    self.joint_token_embed = nn.Embedding(num_joints, d)
    self.vertex_token_init = nn.Linear(num_joints, vertex_tokens[0])
    for s, (dim, ffn) in enumerate(zip(stage_dims, stage_ffn_dims)):
      setattr(
          self,
          f'transformer_{s + 1}',
          fastmetro.Transformer(dim, heads, ffn, 1, dropout, vertex_attention, memory_includes_cam),
      )
    # ModuleDicts keyed by the stage transition k: keys `dim_reduce_*.k.*`.
    changes = [k for k in range(len(stage_dims) - 1) if stage_dims[k + 1] != stage_dims[k]]
    for name in ('dim_reduce_enc_cam', 'dim_reduce_enc_img', 'dim_reduce_dec'):
      setattr(
          self,
          name,
          nn.ModuleDict({str(k): nn.Linear(stage_dims[k], stage_dims[k + 1]) for k in changes}),
      )
    sizes = tuple(vertex_tokens) + (num_vertices,)
    self.vertex_upsample = nn.ModuleList(
        [TokenLinear(sizes[k], sizes[k + 1]) for k in range(len(stage_dims))]
    )
    self.cam_predictor = nn.Linear(stage_dims[-1], 3)
    self.xyz_regressor = nn.Linear(stage_dims[-1], 3)
    if not hand:
      self.coarse2intermediate_upsample = nn.Linear(num_vertices, fine_upsample.shape[1])
    self.fine_upsample = fine_upsample

  def forward(self, images):
    b, j = images.shape[0], self.num_joints
    features = self.backbone(images)
    _, _, h, w = features.shape
    img = self.conv_1x1(features).flatten(2).permute(2, 0, 1)  # [hw, B, D]
    cam = self.cam_token_embed.weight[:, None].repeat(1, b, 1)  # [1, B, D]
    joints = self.joint_token_embed.weight[:, None].repeat(1, b, 1)  # [J, B, D]
    vertices = self.vertex_token_init(joints.permute(1, 2, 0)).permute(2, 0, 1)  # [V0, B, D]
    previous = vertices
    for s, dim in enumerate(self.stage_dims):
      if s > 0:
        k = str(s - 1)
        if k in self.dim_reduce_dec:
          cam = self.dim_reduce_enc_cam[k](cam)
          img = self.dim_reduce_enc_img[k](img)
          tokens = self.dim_reduce_dec[k](torch.cat([joints, vertices], 0))
          joints, vertices = tokens[:j], tokens[j:]
        previous = vertices
        vertices = self.vertex_upsample[s - 1](previous.transpose(0, 1)).transpose(0, 1)
      pos = fastmetro.sine_position_encoding(h, w, dim)[:, None]
      cam, img, tokens = getattr(self, f'transformer_{s + 1}')(
          img,
          cam,
          torch.cat([joints, vertices], 0),
          pos,
          None,
          previous if self.vertex_attention != 'none' else None,
      )
      joints, vertices = tokens[:j], tokens[j:]
    pred_cam = self.cam_predictor(cam).view(b, 3)
    pred_joints = self.xyz_regressor(joints.transpose(0, 1))  # [B, J, 3]
    coarse = self.vertex_upsample[-1](self.xyz_regressor(vertices.transpose(0, 1)))
    if self.hand:
      return fastmetro_hand.hand_mesh_outputs(self.fine_upsample, pred_cam, pred_joints, coarse)
    return fastmetro.mesh_outputs(self, pred_cam, pred_joints, coarse)
