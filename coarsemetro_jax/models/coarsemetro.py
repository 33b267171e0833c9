"""CoarseMETRO-S: coarse-to-fine vertex tokens (paper Sec. 3, Fig. 2-3).

Forward pass:
  backbone -> conv_1x1 -> image tokens X_I [B, 49, D]
  learned camera token X_C [1, D] and 14 joint tokens X_J [14, D]
  (training: up to `joint_mask_ratio` of the joint tokens per sample are
  replaced by a constant, as METRO's masked joint modelling)
  initial vertex tokens X_V = TokenLinear(14 -> 48)(X_J)     # `vertex_token_init`
  three stages s = 1, 2, 3, each FastMETRO's `Transformer` with one encoder
  and one decoder layer (`transformer_s`):
    encoder: pre-norm self-attention over [cam; image] (+ sine PE on image q/k)
    decoder over [joints; vertices]: self-attention, cross-attention to the
      encoder's camera and image features, then the cross-granularity vertex
      cross-attention (queries: the stage's tokens; keys/values: the previous-
      resolution vertex tokens), then the FFN
    between stages: optional width reduction (`dim_reduce_*_{s}`) and the
    token-axis up-sampling of the vertex tokens 48 -> 192 -> 384
    (`vertex_upsample_0/1`)
  heads: cam_predictor (s, tx, ty); xyz_regressor (shared by joints and
  vertices) -> 14 x 3 joints and 384 x 3 vertex points; `vertex_upsample_2`
  (384 -> 431) gives the coarse mesh; learned 431 -> 1723 and fixed 1723 ->
  6890 up-sampling as FastMETRO; optionally FastMETRO's SMPL-parameter head
  on the 1723 mesh (`smpl_param_regressor`, fastmetro.smpl_param_outputs).

CoarseMETRO-Hand (`hand=True`, on a 778 / 195 hand hierarchy) runs the same
stages from 21 joint tokens (config.model.vertex_tokens: configs/hand_r50.py
gives its counts and why); the last `vertex_upsample` maps to the 195-vertex
coarse mesh, and the fixed U[0] to the 778 of the full mesh, as
FastMETRO-Hand (no learned 431 -> 1723 layer).

Choices where the paper is silent are config fields (configs/r50.py documents
the values picked to reproduce Table 1 and why):
  stage_dims / stage_ffn_dims   per-stage width and FFN width
  memory_includes_cam           camera feature in the decoder's memory
  joint_mask_value              constant that replaces a masked joint token
  vertex_attention              'none' | 'beginning' | 'end' (Table 3)
At stage 1 the "previous resolution" vertex tokens are the initial 48 tokens.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.models import fastmetro
from coarsemetro_jax.models import transformer as tfm


def mask_joint_tokens(rng, joints, max_ratio, value):
  """METRO-style random joint masking.

  Per sample, k = floor(u * max_ratio * J) tokens (u ~ U[0, 1)) chosen at
  random are replaced by `value` in every channel. [B, J, D] -> [B, J, D].
  """
  b, j, _ = joints.shape
  u_key, perm_key = jax.random.split(rng)
  num_masked = jnp.floor(jax.random.uniform(u_key, (b, 1)) * max_ratio * j)  # [B, 1]
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(perm_key, (b, j)), -1), -1)
  masked = ranks < num_masked  # [B, J]
  return jnp.where(masked[..., None], jnp.asarray(value, joints.dtype), joints)


class CoarseMETRO(nn.Module):
  """CoarseMETRO body network (paper's "-S": one encoder+decoder block per stage)."""

  backbone: nn.Module
  topology: mesh_topology.MeshTopology
  stage_dims: tuple[int, ...] = (512, 512, 512)
  stage_ffn_dims: tuple[int, ...] = (2048, 2048, 2048)
  vertex_tokens: tuple[int, ...] = (48, 192, 384)
  num_heads: int = 8
  dropout: float = 0.1
  vertex_attention: str = 'end'
  memory_includes_cam: bool = True
  joint_mask_ratio: float = 0.2
  joint_mask_value: float = 0.01
  num_joints: int = 14
  upsample_init: str = 'random'  # 'random' | 'hierarchy' (mesh_outputs)
  smpl_param_regressor: bool = False  # FastMETRO's SMPL-parameter head
  hand: bool = False  # hand network: 195 coarse vertices, fixed up-sampling to 778
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    # images [B, H, W, 3] ImageNet-normalised.
    fastmetro.check_mesh_options(
        self.topology, self.hand, self.upsample_init, self.smpl_param_regressor
    )
    if not (len(self.stage_dims) == len(self.stage_ffn_dims) == len(self.vertex_tokens)):
      raise ValueError(
          f'stage_dims {self.stage_dims}, stage_ffn_dims {self.stage_ffn_dims} and '
          f'vertex_tokens {self.vertex_tokens} must have one entry per stage'
      )
    deterministic = not train
    dense = lambda features, name: tfm.TorchDense(features, dtype=self.dtype, name=name)
    d = self.stage_dims[0]
    features = self.backbone(images, train)  # [B, h, w, C]
    b = features.shape[0]
    img, (h, w) = fastmetro.image_tokens(features, d, self.dtype)  # [B, N, D]
    cam = jnp.broadcast_to(fastmetro.token_embedding(1, d, 'cam_token_embed'), (b, 1, d))
    joints = jnp.broadcast_to(
        fastmetro.token_embedding(self.num_joints, d, 'joint_token_embed'), (b, self.num_joints, d)
    )  # [B, J, D]
    if train and self.joint_mask_ratio > 0:
      joints = mask_joint_tokens(
          self.make_rng('joint_mask'), joints, self.joint_mask_ratio, self.joint_mask_value
      )
    vertices = tfm.TokenLinear(self.vertex_tokens[0], dtype=self.dtype, name='vertex_token_init')(
        joints
    )  # [B, V0, D]
    previous = vertices
    for s, (dim, ffn_dim) in enumerate(zip(self.stage_dims, self.stage_ffn_dims)):
      if s > 0:
        if dim != self.stage_dims[s - 1]:
          cam = dense(dim, f'dim_reduce_enc_cam_{s - 1}')(cam)
          img = dense(dim, f'dim_reduce_enc_img_{s - 1}')(img)
          tokens = dense(dim, f'dim_reduce_dec_{s - 1}')(jnp.concatenate([joints, vertices], 1))
          joints, vertices = tokens[:, : self.num_joints], tokens[:, self.num_joints :]
        previous = vertices  # [B, V_{s-1}, D_s]
        vertices = tfm.TokenLinear(
            self.vertex_tokens[s], dtype=self.dtype, name=f'vertex_upsample_{s - 1}'
        )(
            previous
        )  # [B, V_s, D_s]
      stage = tfm.Transformer(
          num_layers=1,
          num_heads=self.num_heads,
          ffn_dim=ffn_dim,
          dropout=self.dropout,
          vertex_attention=self.vertex_attention,
          memory_includes_cam=self.memory_includes_cam,
          dtype=self.dtype,
          name=f'transformer_{s + 1}',
      )
      cam, img, tokens = stage(
          img,
          cam,
          jnp.concatenate([joints, vertices], 1),
          pos=tfm.sine_position_encoding(h, w, dim),
          self_mask=None,
          vertex_memory=previous if self.vertex_attention != 'none' else None,
          deterministic=deterministic,
      )
      joints, vertices = tokens[:, : self.num_joints], tokens[:, self.num_joints :]

    pred_cam = dense(3, 'cam_predictor')(cam)[:, 0]  # [B, 3]
    xyz_regressor = dense(3, 'xyz_regressor')
    pred_joints = xyz_regressor(joints)  # [B, J, 3]
    coarse = tfm.TokenLinear(
        self.topology.num_vertices[-1],
        dtype=self.dtype,
        name=f'vertex_upsample_{len(self.stage_dims) - 1}',
    )(
        xyz_regressor(vertices)
    )  # [B, V_c, 3]: 431 (body) or 195 (hand)
    if self.hand:
      return fastmetro.hand_mesh_outputs(self.topology, pred_cam, pred_joints, coarse)
    outputs = fastmetro.mesh_outputs(
        self.topology, pred_cam, pred_joints, coarse, self.dtype, self.upsample_init
    )
    if self.smpl_param_regressor:
      outputs = fastmetro.smpl_param_outputs(outputs, train)
    return outputs
