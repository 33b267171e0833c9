"""Attention maps of the paper's Figs. 5-7 from the sown attention weights.

`MultiHeadAttention` sows its softmax weights [B, H, Lq, Lk] into the
'intermediates' collection when `model.apply(..., mutable=['intermediates'])`.
Layers are numbered in forward order over all stages (CoarseMETRO: one
encoder and one decoder layer per stage, so decoder layer 0 is stage 1's;
FastMETRO: transformer_1's layers, then transformer_2's):

  vertex   decoder cross-attention (`multihead_attn`) of chosen vertex tokens
           to the image tokens (Fig. 5)
  joint    the same for chosen joint tokens (Fig. 7)
  camera   encoder self-attention (`self_attn`) of the camera token to the
           image tokens (Fig. 6); `camera_self` is its weight on itself

Every map is averaged over heads. When the decoder's memory includes the
camera feature (config.model.memory_includes_cam) its column is dropped, so the
maps cover image tokens only.
"""

import dataclasses
import re

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import visualize

ENCODER_ATTENTION = ('encoder', 'self_attn')
DECODER_ATTENTION = ('decoder', 'multihead_attn')
# The paper's examples: vertex tokens 2 (left hip) and 43 (left wrist); joint
# tokens for ankles, wrists and head (J14 order).
DEFAULT_VERTEX_TOKENS = (2, 43)
DEFAULT_JOINT_TOKENS = (0, 5, 6, 11, 13)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Which maps to keep (hashable: it is static under jit)."""

  vertex_tokens: tuple[int, ...] = DEFAULT_VERTEX_TOKENS
  joint_tokens: tuple[int, ...] = DEFAULT_JOINT_TOKENS
  decoder_layers: tuple[int, ...] = (0,)  # the paper shows the first one
  encoder_layers: tuple[int, ...] = ()  # () = every encoder layer (Fig. 6)


def _natural_key(path):
  return [int(t) if t.isdigit() else t for p in path for t in re.split(r'(\d+)', p)]


def layer_weights(intermediates, kind):
  """Sown weights [B, H, Lq, Lk] of every encoder or decoder layer, in order.

  `kind` is ENCODER_ATTENTION or DECODER_ATTENTION: the container and the
  attention module name to look for.
  """
  container, module = kind
  flat = traverse_util.flatten_dict(dict(intermediates))
  found = [
      (path, value)
      for path, value in flat.items()
      if path[-1] == 'attention_weights'
      and len(path) >= 3
      and path[-2] == module
      and container in path
  ]
  found.sort(key=lambda item: _natural_key(item[0]))
  return [value[0] if isinstance(value, tuple) else value for _, value in found]


def _pick(items, indices, what):
  if not items:
    raise ValueError(
        f'no {what} attention weights were sown; apply the model with ' "mutable=['intermediates']"
    )
  for i in indices:
    if not -len(items) <= i < len(items):
      raise ValueError(
          f'{what} layer {i} does not exist: the model has {len(items)} '
          f'{what} layers (0..{len(items) - 1})'
      )
  return [items[i] for i in indices]


def select(intermediates, spec, num_joints=joint_tables.NUM_JOINTS):
  """Head-averaged maps for `spec` (shapes static; call inside jit).

  Returns dict:
    vertex [B, nLd, nV, N], joint [B, nLd, nJ, N]   decoder rows over N image tokens
    camera [B, nLe, N], camera_self [B, nLe]        encoder camera-token row
  """
  enc_all = layer_weights(intermediates, ENCODER_ATTENTION)
  enc = _pick(enc_all, spec.encoder_layers or range(len(enc_all)), 'encoder')
  dec = _pick(layer_weights(intermediates, DECODER_ATTENTION), spec.decoder_layers, 'decoder')
  num_image = enc[0].shape[-1] - 1  # encoder keys: [cam; image]
  cam_rows = jnp.stack([w.mean(1)[:, 0] for w in enc], 1)  # [B, nLe, 1+N]
  out = {'camera': cam_rows[..., 1:], 'camera_self': cam_rows[..., 0]}
  vertex, joint = [], []
  for layer, w in zip(spec.decoder_layers, dec):
    w = w.mean(1)  # [B, Lt, Lm]
    w = w[..., w.shape[-1] - num_image :]  # image tokens only
    num_vertices = w.shape[1] - num_joints
    for kind, ids, limit in (
        ('vertex', spec.vertex_tokens, num_vertices),
        ('joint', spec.joint_tokens, num_joints),
    ):
      bad = [i for i in ids if not 0 <= i < limit]
      if bad:
        raise ValueError(
            f'{kind} tokens {bad} do not exist in decoder layer {layer}, '
            f'which has {limit} {kind} tokens (0..{limit - 1})'
        )
    vertex.append(w[:, [num_joints + i for i in spec.vertex_tokens]])
    joint.append(w[:, list(spec.joint_tokens)])
  out['vertex'] = jnp.stack(vertex, 1)
  out['joint'] = jnp.stack(joint, 1)
  return out


def token_grid(maps):
  """[..., N] -> [..., h, w] for a square token grid (row-major, as the model)."""
  n = maps.shape[-1]
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(
        f'{n} image tokens do not form a square grid; attention maps ' 'need a square input crop'
    )
  return maps.reshape(maps.shape[:-1] + (side, side))


def figure(crop, maps, spec):
  """One image's panel (uint8): the crop, then one overlay per map.

  Row 1: decoder maps (vertex tokens, then joint tokens) per chosen layer;
  row 2: the camera token's encoder map per layer, titled with its weight on
  itself. `maps` is one example of `select`'s output (numpy).
  """
  decoder_row = [visualize.label(crop, 'input')]
  for li, layer in enumerate(spec.decoder_layers):
    for vi, token in enumerate(spec.vertex_tokens):
      decoder_row.append(
          visualize.label(
              visualize.heat_overlay(crop, token_grid(maps['vertex'][li, vi])),
              f'dec{layer} v{token}',
          )
      )
    for ji, token in enumerate(spec.joint_tokens):
      decoder_row.append(
          visualize.label(
              visualize.heat_overlay(crop, token_grid(maps['joint'][li, ji])),
              f'dec{layer} {joint_tables.J14_NAMES[token]}',
          )
      )
  layers = spec.encoder_layers or range(len(maps['camera']))
  camera_row = [
      visualize.label(
          visualize.heat_overlay(crop, token_grid(maps['camera'][i])),
          f'enc{layer} cam (self {maps["camera_self"][i]:.2f})',
      )
      for i, layer in enumerate(layers)
  ]
  return visualize.tile([decoder_row, camera_row])
