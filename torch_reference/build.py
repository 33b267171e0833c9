"""Builds the PyTorch reference model described by a `config.model`."""

import torch

from torch_reference import coarsemetro
from torch_reference import fastmetro
from torch_reference import fastmetro_hand
from torch_reference import resnet


def backbone(model_config):
  """(FastMETRO's backbone module, its output channels)."""
  if model_config.backbone == 'hrnet':
    # The whole HighResolutionNet; its forward returns the 2048-channel map.
    from torch_reference import hrnet

    net = hrnet.HRNet(model_config.hrnet_width)
    return net, net.out_channels
  if model_config.backbone == 'resnet50':
    net = resnet.ResNet()
  elif model_config.backbone == 'resnet':
    net = resnet.ResNet(tuple(model_config.resnet_depths), model_config.resnet_width)
  else:
    raise NotImplementedError(f'no PyTorch reference for backbone {model_config.backbone!r}')
  return resnet.trunk(net), net.out_channels


def topology_tensors(topology, num_joints):
  """(decoder mask, True = blocked; dense U[0]: fine <- intermediate, or <- coarse for a hand)."""
  mask = torch.tensor(~topology.decoder_attention_mask(num_joints))
  upsample = torch.tensor(topology.upsample_matrix(0), dtype=torch.float32)
  return mask, upsample


def placeholder_tensors(num_vertices, num_joints):
  """Right-sized stand-ins when the forward pass is not run (key checks)."""
  size = num_joints + num_vertices[-1]
  return (
      torch.zeros(1, 1, dtype=torch.bool).expand(size, size),
      torch.zeros(1, 1).expand(num_vertices[0], num_vertices[1]),
  )


def reference_model(model_config, mask, upsample):
  """FastMETRO or CoarseMETRO (body or hand) in PyTorch with the converter's key layout."""
  net, channels = backbone(model_config)
  m = model_config
  hand = bool(m.get('hand', False))
  if m.name == 'fastmetro' and hand:
    return fastmetro_hand.FastMETROHand(
        net,
        channels,
        mask,
        upsample,
        num_layers=m.fastmetro_layers,
        dims=tuple(m.fastmetro_dims),
        ffn_dims=tuple(m.fastmetro_ffn_dims),
        heads=m.num_heads,
        num_joints=m.num_joints,
        dropout=m.dropout,
    )
  if m.name == 'fastmetro':
    return fastmetro.FastMETRO(
        net,
        channels,
        mask,
        upsample,
        num_layers=m.fastmetro_layers,
        dims=tuple(m.fastmetro_dims),
        ffn_dims=tuple(m.fastmetro_ffn_dims),
        heads=m.num_heads,
        num_joints=m.num_joints,
        dropout=m.dropout,
    )
  if m.name == 'coarsemetro':
    return coarsemetro.CoarseMETRO(
        net,
        channels,
        mask.shape[0] - m.num_joints,
        upsample,
        stage_dims=tuple(m.stage_dims),
        stage_ffn_dims=tuple(m.stage_ffn_dims),
        vertex_tokens=tuple(m.vertex_tokens),
        heads=m.num_heads,
        vertex_attention=m.vertex_attention,
        memory_includes_cam=m.memory_includes_cam,
        num_joints=m.num_joints,
        dropout=m.dropout,
        hand=hand,
    )
  raise ValueError(m.name)
