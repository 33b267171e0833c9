"""FastMETRO_Body_Network in PyTorch: FastMETRO's module tree and forward.

Sequence-first (L, B, E) as the original; pre-norm DETR-style layers with
`nn.MultiheadAttention`; the decoder mask is a boolean (True = blocked)
argument and the fixed 1723 -> 6890 up-sampling a dense matrix, both built
from a `MeshTopology` by the test (neither is in the state dict).
The decoder layer also carries CoarseMETRO's optional vertex cross-attention
(`vertex_attn`), used by torch_reference/coarsemetro.py.
"""

import math

import torch
from torch import nn


def sine_position_encoding(height, width, dim):
  """PositionEmbeddingSine(dim/2, normalize=True, scale=2pi): [H*W, dim], row-major."""
  feats = dim // 2
  y = torch.arange(1, height + 1, dtype=torch.float32)[:, None].expand(height, width)
  x = torch.arange(1, width + 1, dtype=torch.float32)[None, :].expand(height, width)
  y = y / (height + 1e-6) * 2 * math.pi
  x = x / (width + 1e-6) * 2 * math.pi
  dim_t = 10000.0 ** (2 * torch.div(torch.arange(feats), 2, rounding_mode='floor') / feats)

  def encode(p):
    p = p[..., None] / dim_t  # [H, W, F]
    return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], -1).flatten(2)

  return torch.cat([encode(y), encode(x)], -1).reshape(height * width, dim)


class EncoderLayer(nn.Module):
  """Pre-norm: x += MHA(LN1(x) + pos, LN1(x) + pos, LN1(x)); x += FFN(LN2(x))."""

  def __init__(self, dim, heads, ffn_dim, dropout=0.1):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
    self.linear1 = nn.Linear(dim, ffn_dim)
    self.dropout = nn.Dropout(dropout)
    self.linear2 = nn.Linear(ffn_dim, dim)
    self.norm1 = nn.LayerNorm(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.dropout1 = nn.Dropout(dropout)
    self.dropout2 = nn.Dropout(dropout)

  def forward(self, x, pos):
    s = self.norm1(x)
    qk = s + pos
    x = x + self.dropout1(self.self_attn(qk, qk, s, need_weights=False)[0])
    s = self.norm2(x)
    return x + self.dropout2(self.linear2(self.dropout(torch.relu(self.linear1(s)))))


class DecoderLayer(nn.Module):
  """Pre-norm: masked self-attention, cross-attention to memory, FFN.

  vertex_attention 'beginning'/'end' adds a cross-attention from the tokens
  to `vertex_memory` (norm_vertex on the queries, norm_vertex_memory on the
  keys/values) before the self-attention or after the image cross-attention.
  """

  def __init__(self, dim, heads, ffn_dim, dropout=0.1, vertex_attention='none'):
    super().__init__()
    self.vertex_attention = vertex_attention
    self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
    self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
    if vertex_attention != 'none':
      self.vertex_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
    self.linear1 = nn.Linear(dim, ffn_dim)
    self.dropout = nn.Dropout(dropout)
    self.linear2 = nn.Linear(ffn_dim, dim)
    self.norm1 = nn.LayerNorm(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.norm3 = nn.LayerNorm(dim)
    if vertex_attention != 'none':
      self.norm_vertex = nn.LayerNorm(dim)
      self.norm_vertex_memory = nn.LayerNorm(dim)
      self.dropout_vertex = nn.Dropout(dropout)
    self.dropout1 = nn.Dropout(dropout)
    self.dropout2 = nn.Dropout(dropout)
    self.dropout3 = nn.Dropout(dropout)

  def _vertex_block(self, t, vertex_memory):
    kv = self.norm_vertex_memory(vertex_memory)
    s = self.norm_vertex(t)
    return t + self.dropout_vertex(self.vertex_attn(s, kv, kv, need_weights=False)[0])

  def forward(self, t, memory, memory_pos, mask=None, vertex_memory=None):
    if self.vertex_attention == 'beginning':
      t = self._vertex_block(t, vertex_memory)
    s = self.norm1(t)  # query_pos is zero in FastMETRO
    t = t + self.dropout1(self.self_attn(s, s, s, attn_mask=mask, need_weights=False)[0])
    s = self.norm2(t)
    t = t + self.dropout2(
        self.multihead_attn(s, memory + memory_pos, memory, need_weights=False)[0]
    )
    if self.vertex_attention == 'end':
      t = self._vertex_block(t, vertex_memory)
    s = self.norm3(t)
    return t + self.dropout3(self.linear2(self.dropout(torch.relu(self.linear1(s)))))


class Encoder(nn.Module):

  def __init__(self, num_layers, *args):
    super().__init__()
    self.layers = nn.ModuleList([EncoderLayer(*args) for _ in range(num_layers)])
    self.norm = nn.LayerNorm(args[0])

  def forward(self, x, pos):
    for layer in self.layers:
      x = layer(x, pos)
    return self.norm(x)


class Decoder(nn.Module):

  def __init__(self, num_layers, dim, heads, ffn_dim, dropout, vertex_attention):
    super().__init__()
    self.layers = nn.ModuleList(
        [DecoderLayer(dim, heads, ffn_dim, dropout, vertex_attention) for _ in range(num_layers)]
    )
    self.norm = nn.LayerNorm(dim)

  def forward(self, t, memory, memory_pos, mask=None, vertex_memory=None):
    for layer in self.layers:
      t = layer(t, memory, memory_pos, mask, vertex_memory)
    return self.norm(t)


class Transformer(nn.Module):
  """Encoder over [cam; image] (cam without position), decoder over the tokens.

  The decoder's memory is the image part of the encoder output (FastMETRO)
  or, with memory_includes_cam, the whole output (camera at position zero).
  """

  def __init__(
      self,
      dim,
      heads,
      ffn_dim,
      num_layers,
      dropout=0.1,
      vertex_attention='none',
      memory_includes_cam=False,
  ):
    super().__init__()
    self.memory_includes_cam = memory_includes_cam
    self.encoder = Encoder(num_layers, dim, heads, ffn_dim, dropout)
    self.decoder = Decoder(num_layers, dim, heads, ffn_dim, dropout, vertex_attention)

  def forward(self, img, cam, tokens, pos, mask=None, vertex_memory=None):
    # img [N, B, E]; cam [1, B, E]; tokens [L, B, E]; pos [N, 1, E].
    enc_pos = torch.cat([torch.zeros_like(pos[:1]), pos], 0)
    x = self.encoder(torch.cat([cam, img], 0), enc_pos)
    cam_f, img_f = x[:1], x[1:]
    memory, memory_pos = (x, enc_pos) if self.memory_includes_cam else (img_f, pos)
    t = self.decoder(tokens, memory, memory_pos, mask, vertex_memory)
    return cam_f, img_f, t


class FastMETRO(nn.Module):
  """FastMETRO_Body_Network (released layout); `num_layers` 1/2/3 = S/M/L."""

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
      num_joints=14,
      dropout=0.1,
  ):
    super().__init__()
    num_vertices = attention_mask.shape[0] - num_joints
    num_intermediate = fine_upsample.shape[1]
    self.num_joints = num_joints
    self.backbone = backbone
    self.transformer_1 = Transformer(dims[0], heads, ffn_dims[0], num_layers, dropout)
    self.transformer_2 = Transformer(dims[1], heads, ffn_dims[1], num_layers, dropout)
    self.dim_reduce_enc_cam = nn.Linear(dims[0], dims[1])
    self.dim_reduce_enc_img = nn.Linear(dims[0], dims[1])
    self.dim_reduce_dec = nn.Linear(dims[0], dims[1])
    self.cam_token_embed = nn.Embedding(1, dims[0])
    self.joint_token_embed = nn.Embedding(num_joints, dims[0])
    self.vertex_token_embed = nn.Embedding(num_vertices, dims[0])
    self.xyz_regressor = nn.Linear(dims[1], 3)
    self.cam_predictor = nn.Linear(dims[1], 3)
    self.conv_1x1 = nn.Conv2d(backbone_channels, dims[0], 1)
    self.coarse2intermediate_upsample = nn.Linear(num_vertices, num_intermediate)
    # Not parameters (FastMETRO keeps the mask as a plain attribute).
    self.attention_mask = attention_mask  # [J+V, J+V], True = blocked
    self.fine_upsample = fine_upsample  # [V_fine, V_int]

  def forward(self, images):
    b = images.shape[0]
    features = self.backbone(images)  # [B, C, h, w]
    _, _, h, w = features.shape
    img = self.conv_1x1(features).flatten(2).permute(2, 0, 1)  # [hw, B, D1]
    cam = self.cam_token_embed.weight[:, None].repeat(1, b, 1)
    jv = torch.cat([self.joint_token_embed.weight, self.vertex_token_embed.weight], 0)
    jv = jv[:, None].repeat(1, b, 1)  # [J+V, B, D1]
    pos_1 = sine_position_encoding(h, w, img.shape[-1])[:, None]
    pos_2 = sine_position_encoding(h, w, self.dim_reduce_dec.out_features)[:, None]
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
    coarse = xyz[:, self.num_joints :]
    return mesh_outputs(self, pred_cam, xyz[:, : self.num_joints], coarse)


def mesh_outputs(model, pred_cam, joints, coarse):
  intermediate = model.coarse2intermediate_upsample(coarse.transpose(1, 2)).transpose(1, 2)
  fine = torch.einsum('uv,bvc->buc', model.fine_upsample, intermediate)
  return {
      'pred_cam': pred_cam,
      'pred_3d_joints': joints,
      'pred_3d_vertices_coarse': coarse,
      'pred_3d_vertices_intermediate': intermediate,
      'pred_3d_vertices_fine': fine,
  }
