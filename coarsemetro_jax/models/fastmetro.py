"""FastMETRO-S/M/L (`FastMETRO_Body_Network`, `FastMETRO_Hand_Network`), in Flax.

Forward pass of the released PyTorch code (`FastMETRO_Body_Network.forward`):
backbone -> conv_1x1 -> 49 image tokens; transformer_1 (width 512) over
[cam; image] and [14 joints; 431 vertices] with the adjacency mask ->
dim_reduce_* to 128 -> transformer_2 -> cam_predictor / xyz_regressor ->
learned 431 -> 1723 (`coarse2intermediate_upsample`) -> fixed 1723 -> 6890.
S/M/L differ only in layers per transformer (1/2/3). With
`smpl_param_regressor` (the released `use_smpl_param_regressor`), the
SMPL-parameter head reads the raw intermediate mesh and adds pred_rotmat and
pred_betas (`smpl_param_outputs`).

The hand network (`hand=True`, on a 778 / 195 hand hierarchy) is the same
with 21 joint tokens and 195 vertex tokens, the 195-vertex mesh graph as the
decoder mask, and no learned up-sampling layer: the 195 coarse vertices go to
the 778 of the full mesh through the hierarchy's fixed U[0]
(`hand_mesh_outputs`); its state-dict keys are the body network's without
`coarse2intermediate_upsample`.
"""

import flax.linen as nn
import jax.numpy as jnp

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.models import smpl_param_regressor as spr
from coarsemetro_jax.models import transformer as tfm

# The body networks' learned 431 -> 1723 up-sampling (PyTorch attribute name);
# the hand networks have none.
UPSAMPLE_MODULE = 'coarse2intermediate_upsample'

EMBED_INIT = nn.initializers.normal(1.0)  # torch nn.Embedding: N(0, 1)


def conv_1x1(features, fan_in, dtype, name='conv_1x1'):
  """Conv2d(C -> D, k=1, bias) with PyTorch's default init."""
  init = tfm.torch_linear_init(fan_in)
  return nn.Conv(features, (1, 1), kernel_init=init, bias_init=init, dtype=dtype, name=name)


def token_embedding(num, dim, name):
  return nn.Embed(num, dim, embedding_init=EMBED_INIT, name=name).embedding  # [num, dim]


def image_tokens(features, dim, dtype):
  """conv_1x1 on backbone features, flattened row-major. [B,h,w,C] -> [B,h*w,D]."""
  b, h, w, c = features.shape
  x = conv_1x1(dim, c, dtype)(features)
  return x.reshape(b, h * w, dim), (h, w)


class FastMETRO(nn.Module):
  """FastMETRO body network. `num_layers` = 1/2/3 for S/M/L."""

  backbone: nn.Module
  topology: mesh_topology.MeshTopology
  num_layers: int = 1
  dims: tuple[int, int] = (512, 128)
  ffn_dims: tuple[int, int] = (2048, 512)
  num_heads: int = 8
  dropout: float = 0.1
  num_joints: int = 14
  upsample_init: str = 'random'  # 'random' | 'hierarchy' (mesh_outputs)
  smpl_param_regressor: bool = False  # the SMPL-parameter head (smpl_param_outputs)
  hand: bool = False  # FastMETRO_Hand_Network: fixed coarse -> full up-sampling
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train=False):
    # images [B, H, W, 3] ImageNet-normalised.
    check_mesh_options(self.topology, self.hand, self.upsample_init, self.smpl_param_regressor)
    deterministic = not train
    d1, d2 = self.dims
    features = self.backbone(images, train)  # [B, h, w, C]
    b = features.shape[0]
    img, (h, w) = image_tokens(features, d1, self.dtype)  # [B, N, D1]
    num_coarse = self.topology.num_vertices[-1]
    cam = jnp.broadcast_to(token_embedding(1, d1, 'cam_token_embed'), (b, 1, d1))
    jv = jnp.concatenate(
        [
            token_embedding(self.num_joints, d1, 'joint_token_embed'),
            token_embedding(num_coarse, d1, 'vertex_token_embed'),
        ],
        0,
    )
    jv = jnp.broadcast_to(jv, (b,) + jv.shape)  # [B, J+V, D1]
    mask = self.topology.decoder_attention_mask(self.num_joints)  # [J+V, J+V]

    def transformer(name, ffn_dim):
      return tfm.Transformer(
          num_layers=self.num_layers,
          num_heads=self.num_heads,
          ffn_dim=ffn_dim,
          dropout=self.dropout,
          dtype=self.dtype,
          name=name,
      )

    cam, img, jv = transformer('transformer_1', self.ffn_dims[0])(
        img,
        cam,
        jv,
        pos=tfm.sine_position_encoding(h, w, d1),
        self_mask=mask,
        deterministic=deterministic,
    )
    cam = tfm.TorchDense(d2, dtype=self.dtype, name='dim_reduce_enc_cam')(cam)
    img = tfm.TorchDense(d2, dtype=self.dtype, name='dim_reduce_enc_img')(img)
    jv = tfm.TorchDense(d2, dtype=self.dtype, name='dim_reduce_dec')(jv)
    cam, _, jv = transformer('transformer_2', self.ffn_dims[1])(
        img,
        cam,
        jv,
        pos=tfm.sine_position_encoding(h, w, d2),
        self_mask=mask,
        deterministic=deterministic,
    )
    pred_cam = tfm.TorchDense(3, dtype=self.dtype, name='cam_predictor')(cam)[:, 0]  # [B, 3]
    xyz = tfm.TorchDense(3, dtype=self.dtype, name='xyz_regressor')(jv)  # [B, J+V, 3]
    if self.hand:
      return hand_mesh_outputs(
          self.topology, pred_cam, xyz[:, : self.num_joints], xyz[:, self.num_joints :]
      )
    outputs = mesh_outputs(
        self.topology,
        pred_cam,
        xyz[:, : self.num_joints],
        xyz[:, self.num_joints :],
        self.dtype,
        self.upsample_init,
    )
    return smpl_param_outputs(outputs, train) if self.smpl_param_regressor else outputs


UPSAMPLE_INITS = ('random', 'hierarchy')


def check_mesh_options(topology, hand, upsample_init, smpl_param_regressor):
  """Raises a one-line ValueError when the model's mesh options contradict each other."""
  levels = topology.num_vertices
  if hand and len(levels) != 2:
    raise ValueError(
        f'the hand network needs a 2-level hand hierarchy (778 / 195 vertices), got levels '
        f'{levels} from {topology.source or "the given topology"}'
    )
  if not hand and len(levels) != 3:
    raise ValueError(
        f'the body network needs a 3-level body hierarchy (6890 / 1723 / 431 vertices), got '
        f'levels {levels} from {topology.source or "the given topology"}'
        + (' (a hand hierarchy: set config.model.hand)' if len(levels) == 2 else '')
    )
  if hand and upsample_init != 'random':
    raise ValueError(
        f'config.model.upsample_init={upsample_init!r} sets the start of the learned 431 -> '
        "1723 layer, which the hand network does not have; leave it 'random'"
    )
  if hand and smpl_param_regressor:
    raise ValueError(
        'config.model.smpl_param_regressor: the SMPL-parameter head belongs to the body '
        'network; the hand network has none'
    )


def hand_mesh_outputs(topology, pred_cam, joints, coarse):
  """The hand network's outputs: fixed up-sampling of the coarse mesh to the full one.

  coarse [B, 195, 3] -> pred_3d_vertices_fine [B, 778, 3] through U[0], as a
  gather of its 3 non-zeros per row (`MeshTopology.upsample`): the same
  numbers as the dense [778, 195] product.
  """
  f32 = lambda x: x.astype(jnp.float32)
  return {
      'pred_cam': f32(pred_cam),
      'pred_3d_joints': f32(joints),
      'pred_3d_vertices_coarse': f32(coarse),
      'pred_3d_vertices_fine': topology.upsample(f32(coarse), from_level=1),
  }


def mesh_outputs(topology, pred_cam, joints, coarse, dtype, upsample_init='random'):
  """Learned coarse -> intermediate up-sampling, fixed gather to the full mesh.

  Must be called inside a compact method (creates `coarse2intermediate_upsample`).
  upsample_init: 'random' starts the learned 431 -> 1723 layer as PyTorch's
  nn.Linear (FastMETRO, the paper); 'hierarchy' starts it at the mesh
  hierarchy's fixed barycentric up-sampling (kernel U^T, bias 0), so a short
  run from scratch begins with smooth meshes instead of random mixtures.
  """
  if upsample_init not in UPSAMPLE_INITS:
    raise ValueError(f'upsample_init must be one of {UPSAMPLE_INITS}, got {upsample_init!r}')
  init = {}
  if upsample_init == 'hierarchy':
    u_t = topology.upsample_matrix(1).T  # [431, 1723]
    init = {
        'kernel_init': lambda key, shape, dtype=jnp.float32: jnp.asarray(u_t, dtype),
        'bias_init': nn.initializers.zeros,
    }
  intermediate = tfm.TokenLinear(
      topology.num_vertices[1], dtype=dtype, name=UPSAMPLE_MODULE, **init
  )(
      coarse
  )  # [B, 1723, 3]
  fine = topology.upsample(intermediate.astype(jnp.float32), from_level=1)  # [B, 6890, 3]
  f32 = lambda x: x.astype(jnp.float32)
  return {
      'pred_cam': f32(pred_cam),
      'pred_3d_joints': f32(joints),
      'pred_3d_vertices_coarse': f32(coarse),
      'pred_3d_vertices_intermediate': f32(intermediate),
      'pred_3d_vertices_fine': fine,
  }


def smpl_param_outputs(outputs, train):
  """`outputs` plus the SMPL-parameter head's pred_rotmat [B, 24, 3, 3] and pred_betas [B, 10].

  Must be called inside a compact method (creates `smpl_parameter_regressor`,
  the released attribute name). The head reads the raw intermediate mesh
  (not pelvis-centred), detached, as FastMETRO does; its BatchNorm follows
  `train`.
  """
  head = spr.SMPLParamRegressor(name='smpl_parameter_regressor')
  return {**outputs, **head(outputs['pred_3d_vertices_intermediate'], train)}
