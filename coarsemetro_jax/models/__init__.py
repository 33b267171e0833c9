"""Model construction from `config.model` (no registry: two models, one if)."""

import jax.numpy as jnp

from coarsemetro_jax.models import coarsemetro
from coarsemetro_jax.models import fastmetro
from coarsemetro_jax.models import resnet

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(model_config):
  if model_config.compute_dtype not in DTYPES:
    raise ValueError(
        f'config.model.compute_dtype must be one of {sorted(DTYPES)}, '
        f'got {model_config.compute_dtype!r}'
    )
  return DTYPES[model_config.compute_dtype]


def build_backbone(model_config):
  """ResNet-50, a custom-size ResNet, or HRNet-W{32,48,64}."""
  dtype = compute_dtype(model_config)
  name = model_config.backbone
  if name == 'resnet50':
    return resnet.ResNet50(
        remat=model_config.backbone_remat,
        zero_init_residual=model_config.resnet_zero_init_residual,
        dtype=dtype,
    )
  if name == 'resnet':
    return resnet.ResNet(
        depths=tuple(model_config.resnet_depths),
        width=model_config.resnet_width,
        remat=model_config.backbone_remat,
        zero_init_residual=model_config.resnet_zero_init_residual,
        dtype=dtype,
    )
  if name == 'hrnet':
    from coarsemetro_jax.models import hrnet

    return hrnet.HRNet(
        width=model_config.hrnet_width, remat=model_config.backbone_remat, dtype=dtype
    )
  raise ValueError(
      f"config.model.backbone must be 'resnet50', 'resnet' or 'hrnet', " f'got {name!r}'
  )


def build_model(model_config, topology):
  """CoarseMETRO or FastMETRO for `config.model`, on the given mesh hierarchy.

  `config.model.hand` asks for the hand network (on a hand hierarchy); a config
  without the field builds the body network.
  """
  dtype = compute_dtype(model_config)
  backbone = build_backbone(model_config)
  if model_config.name == 'coarsemetro':
    return coarsemetro.CoarseMETRO(
        backbone=backbone,
        topology=topology,
        stage_dims=tuple(model_config.stage_dims),
        stage_ffn_dims=tuple(model_config.stage_ffn_dims),
        vertex_tokens=tuple(model_config.vertex_tokens),
        num_heads=model_config.num_heads,
        dropout=model_config.dropout,
        vertex_attention=model_config.vertex_attention,
        memory_includes_cam=model_config.memory_includes_cam,
        joint_mask_ratio=model_config.joint_mask_ratio,
        joint_mask_value=model_config.joint_mask_value,
        num_joints=model_config.num_joints,
        upsample_init=model_config.upsample_init,
        smpl_param_regressor=model_config.smpl_param_regressor,
        hand=model_config.get('hand', False),
        dtype=dtype,
    )
  if model_config.name == 'fastmetro':
    return fastmetro.FastMETRO(
        backbone=backbone,
        topology=topology,
        num_layers=model_config.fastmetro_layers,
        dims=tuple(model_config.fastmetro_dims),
        ffn_dims=tuple(model_config.fastmetro_ffn_dims),
        num_heads=model_config.num_heads,
        dropout=model_config.dropout,
        num_joints=model_config.num_joints,
        upsample_init=model_config.upsample_init,
        smpl_param_regressor=model_config.smpl_param_regressor,
        hand=model_config.get('hand', False),
        dtype=dtype,
    )
  raise ValueError(
      f"config.model.name must be 'coarsemetro' or 'fastmetro', " f'got {model_config.name!r}'
  )
