"""FastMETRO_Hand_Network in PyTorch, written from its description.

The body network (torch_reference/fastmetro.py) with these differences:
21 joint tokens and 195 vertex tokens; the decoder mask is the 195-vertex
hand mesh graph (`mano_195_adjmat_*.pt`, rebuilt by the test from a
`MeshTopology`, True = blocked); no learned up-sampling layer: the 195
coarse vertices go to MANO's 778 through the hierarchy's fixed U[0]
(778 x 195, dense here). Its outputs are pred_cam, pred_3d_joints [B, 21, 3],
pred_3d_vertices_coarse [B, 195, 3] and pred_3d_vertices_fine [B, 778, 3];
its state-dict keys are the body network's without
`coarse2intermediate_upsample`. Sequence-first (L, B, E) as the original.
"""

import torch
from torch import nn

from torch_reference import fastmetro


class FastMETROHand(nn.Module):
  """FastMETRO_Hand_Network (released key layout); `num_layers` 1/2/3 = S/M/L."""

  def __init__(
      self,
      backbone,
      backbone_channels,
      attention_mask,
      fine_upsample,
      num_layers=1,
      dims=(512, 128),
      ffn_dims=(2048, 512),
      heads=8,
      num_joints=21,
      dropout=0.1,
  ):
    super().__init__()
    num_vertices = attention_mask.shape[0] - num_joints
    if fine_upsample.shape[1] != num_vertices:
      raise ValueError(
          f'up-sampling {tuple(fine_upsample.shape)} does not start from the '
          f'{num_vertices} vertex tokens'
      )
    self.num_joints = num_joints
    # Registration order of the released network (its state-dict order).
    self.backbone = backbone
    self.transformer_1 = fastmetro.Transformer(dims[0], heads, ffn_dims[0], num_layers, dropout)
    self.transformer_2 = fastmetro.Transformer(dims[1], heads, ffn_dims[1], num_layers, dropout)
    self.dim_reduce_enc_cam = nn.Linear(dims[0], dims[1])
    self.dim_reduce_enc_img = nn.Linear(dims[0], dims[1])
    self.dim_reduce_dec = nn.Linear(dims[0], dims[1])
    self.cam_token_embed = nn.Embedding(1, dims[0])
    self.joint_token_embed = nn.Embedding(num_joints, dims[0])
    self.vertex_token_embed = nn.Embedding(num_vertices, dims[0])
    self.xyz_regressor = nn.Linear(dims[1], 3)
    self.cam_predictor = nn.Linear(dims[1], 3)
    self.conv_1x1 = nn.Conv2d(backbone_channels, dims[0], 1)
    # Not parameters: the mask and the mesh sampler are plain attributes.
    self.attention_mask = attention_mask  # [J+V, J+V], True = blocked
    self.fine_upsample = fine_upsample  # [V_fine, V_coarse] = U[0]

  def forward(self, images):
    b = images.shape[0]
    features = self.backbone(images)  # [B, C, h, w]
    _, _, h, w = features.shape
    img = self.conv_1x1(features).flatten(2).permute(2, 0, 1)  # [hw, B, D1]
    cam = self.cam_token_embed.weight[:, None].repeat(1, b, 1)  # [1, B, D1]
    jv = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], 0)
    jv = jv[:, None].repeat(1, b, 1)  # [J+V, B, D1]
    pos_1 = fastmetro.sine_position_encoding(h, w, img.shape[-1])[:, None]
    pos_2 = fastmetro.sine_position_encoding(h, w, self.dim_reduce_dec.out_features)[:, None]
    cam, img, jv = self.transformer_1(img, cam, jv, pos_1, self.attention_mask)
    cam, _, jv = self.transformer_2(
        self.dim_reduce_enc_img(img),
        self.dim_reduce_enc_cam(cam),
        self.dim_reduce_dec(jv),
        pos_2,
        self.attention_mask,
    )
    pred_cam = self.cam_predictor(cam).view(b, 3)
    xyz = self.xyz_regressor(jv.transpose(0, 1))  # [B, J+V, 3]
    return hand_mesh_outputs(
        self.fine_upsample, pred_cam, xyz[:, : self.num_joints], xyz[:, self.num_joints :]
    )


def hand_mesh_outputs(fine_upsample, pred_cam, joints, coarse):
  """The hand outputs: coarse [B, 195, 3] -> fine [B, 778, 3] = U[0] @ coarse."""
  return {
      'pred_cam': pred_cam,
      'pred_3d_joints': joints,
      'pred_3d_vertices_coarse': coarse,
      'pred_3d_vertices_fine': torch.einsum('uv,bvc->buc', fine_upsample, coarse),
  }
