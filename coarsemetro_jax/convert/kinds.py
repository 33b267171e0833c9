"""Checkpoint kinds: which model a state dict belongs to, and its Flax shapes.

Kind names:
  resnet50-imagenet                torchvision ImageNet ResNet-50 (resnet50-0676ba61.pth);
                                   backbone only, `fc` carried
  hrnet-w{32,48,64}-imagenet       HRNet classification file; `classifier` carried
  resnet-imagenet                  torchvision-layout ResNet of config.model.resnet_*
  fastmetro-{S,M,L}-{r50,h64,...}  FastMETRO_Body_Network state dict (1/2/3 layers)
  coarsemetro-S-{r50,h64,...}      CoarseMETRO state dict (tables.py docstring)
  ...-resnet                       either model on config.model.resnet_* (tests)
  ...-smplparam                    either model with the SMPL-parameter head (FastMETRO's
                                   parametric checkpoints: fastmetro-L-h64-smplparam)
  ...-hand                         either model's hand network (FastMETRO_Hand_Network:
                                   fastmetro-L-h64-hand, the released FreiHAND file)

A kind fixes config.model.{name, backbone, hrnet_width, fastmetro_layers,
smpl_param_regressor, hand, num_joints}; every other model field (widths,
CoarseMETRO stages) comes from the config the conversion runs with
(configs/r50.py unless --config is given).

A hand network's state dict has the body network's keys without
`coarse2intermediate_upsample` (its up-sampling is a fixed matrix), which is
how detection tells them apart; its token embeddings (21 joint rows, and 195
vertex rows for FastMETRO) then confirm it.
"""

import collections.abc
import contextlib
import copy
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import config_files
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables

FASTMETRO_SIZES = {'S': 1, 'M': 2, 'L': 3}
BACKBONE_TAGS = {
    'r50': ('resnet50', 64),
    'h64': ('hrnet', 64),
    'h48': ('hrnet', 48),
    'h32': ('hrnet', 32),
    'resnet': ('resnet', 64),
}
# A source checkout's configs/ (not installed with the package): the default
# model config of the command line when --config is not given.
SMPL_PARAM_SUFFIX = 'smplparam'  # kind suffix of a model with the SMPL-parameter head
HAND_SUFFIX = 'hand'  # kind suffix of a hand network
BODY_JOINTS = 14  # joint tokens of the body networks (J14)
HAND_JOINTS = 21  # of the hand networks (MANO's 16 joints and 5 fingertips)
REPO_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs'
)


# ----------------------------------------------------------------------------
# Configs.


def load_config(spec=''):
  """The locked config of 'path/to/config.py[:arg]'; '' = the checkout's configs/r50.py."""
  if not spec:
    spec = os.path.join(REPO_CONFIGS, 'r50.py')
    if not os.path.isfile(spec):
      raise config_files.ConfigError(
          f'no --config given and there is no {spec} (configs/ is not installed with the '
          "package); pass --config path/to/configs/r50.py or the model's config"
      )
  return config_files.load(spec)


def _backbone_tag(model_config):
  name = model_config.backbone
  if name == 'resnet50':
    return 'r50'
  if name == 'hrnet':
    return f'h{model_config.hrnet_width}'
  return name


def kind_of(model_config, scope='model'):
  """Kind name of a model config (scope 'backbone': its ImageNet file)."""
  if scope == 'backbone':
    name = model_config.backbone
    return (
        'resnet50-imagenet'
        if name == 'resnet50'
        else f'hrnet-w{model_config.hrnet_width}-imagenet'
        if name == 'hrnet'
        else f'{name}-imagenet'
    )
  size = (
      {v: k for k, v in FASTMETRO_SIZES.items()}.get(
          model_config.fastmetro_layers, str(model_config.fastmetro_layers)
      )
      if model_config.name == 'fastmetro'
      else 'S'
  )
  head = f'-{SMPL_PARAM_SUFFIX}' if model_config.get('smpl_param_regressor', False) else ''
  if tables.is_hand(model_config):
    head = f'-{HAND_SUFFIX}'
  return f'{model_config.name}-{size}-{_backbone_tag(model_config)}{head}'


def normalize_kind(kind):
  """Accepts the release spelling: 'FastMETRO-S-R50' -> 'fastmetro-S-r50' (-Hand -> -hand)."""
  parts = kind.strip().split('-')
  if len(parts) in (3, 4) and parts[0].lower() in ('fastmetro', 'coarsemetro'):
    return '-'.join([parts[0].lower(), parts[1].upper()] + [p.lower() for p in parts[2:]])
  return kind.strip().lower()


def _backbone_of_tag(tag):
  """'r50' / 'h64' / 'resnet' / any 'h<width>' -> (backbone, hrnet width), else None."""
  if tag in BACKBONE_TAGS:
    return BACKBONE_TAGS[tag]
  if re.fullmatch(r'h[1-9]\d*', tag):
    return 'hrnet', int(tag[1:])
  return None


def parse_kind(kind):
  """Kind -> (scope, overrides of config.model)."""
  parts = normalize_kind(kind).split('-')
  head = len(parts) == 4 and parts[3] == SMPL_PARAM_SUFFIX
  hand = len(parts) == 4 and parts[3] == HAND_SUFFIX
  if head or hand:
    parts = parts[:3]
  if parts[-1] == 'imagenet':
    bb = '-'.join(parts[:-1])
    if bb == 'resnet50':
      return 'backbone', {'backbone': 'resnet50'}
    if bb == 'resnet':
      return 'backbone', {'backbone': 'resnet'}
    if bb.startswith('hrnet-w') and bb[7:].isdigit():
      return 'backbone', {'backbone': 'hrnet', 'hrnet_width': int(bb[7:])}
  elif len(parts) == 3 and _backbone_of_tag(parts[2]):
    name, size, tag = parts
    backbone, width = _backbone_of_tag(tag)
    overrides = {
        'name': name,
        'backbone': backbone,
        'smpl_param_regressor': head,
        'hand': hand,
        'num_joints': HAND_JOINTS if hand else BODY_JOINTS,
    }
    if backbone == 'hrnet':
      overrides['hrnet_width'] = width
    if name == 'fastmetro' and size in FASTMETRO_SIZES:
      return 'model', dict(overrides, fastmetro_layers=FASTMETRO_SIZES[size])
    if name == 'coarsemetro' and size == 'S':
      return 'model', overrides
  raise ValueError(
      f'unknown checkpoint kind {kind!r}; kinds look like resnet50-imagenet, '
      'fastmetro-{S,M,L}-{r50,h64}, coarsemetro-S-{r50,h64}, '
      f'fastmetro-L-h64-{SMPL_PARAM_SUFFIX}, fastmetro-L-h64-{HAND_SUFFIX}'
  )


def apply_kind(kind, config):
  """A copy of `config` whose model is that of `kind`; returns (config, scope)."""
  scope, overrides = parse_kind(kind)
  config = copy.deepcopy(config)
  with config.unlocked() if hasattr(config, 'unlocked') else contextlib.nullcontext():
    for k, v in overrides.items():
      setattr(config.model, k, v)
  return config, scope


# ----------------------------------------------------------------------------
# Detection.


def candidate_kinds(config):
  """Kinds a file may be, given the config's non-kind fields."""
  tags = ['r50', 'h64']
  if config.model.backbone == 'hrnet' and f'h{config.model.hrnet_width}' not in tags:
    tags.append(f'h{config.model.hrnet_width}')
  if config.model.backbone == 'resnet':
    tags.append('resnet')
  kinds = []
  for tag in tags:
    models = [f'fastmetro-{s}-{tag}' for s in FASTMETRO_SIZES] + [f'coarsemetro-S-{tag}']
    kinds += models + [f'{m}-{SMPL_PARAM_SUFFIX}' for m in models]
    kinds += [f'{m}-{HAND_SUFFIX}' for m in models]
  kinds += ['resnet50-imagenet', 'hrnet-w64-imagenet']
  if config.model.backbone == 'resnet':
    kinds.append('resnet-imagenet')
  return kinds


def kind_table(kind, config):
  kind_config, scope = apply_kind(kind, config)
  return tables.model_table(kind_config.model, scope)


def _mismatch(keys, table):
  """(missing, unexpected, carried) keys of a file for a table."""
  expected = set(tables.torch_keys(table))
  _, ignorable = tables.expand(table)
  missing = expected - keys
  rest = keys - expected - set(ignorable)
  carried = {k for k in rest if tables.carrying_module(k, table)}
  unexpected = {k for k in rest - carried if not tables.is_ignored(k, table)}
  return missing, unexpected, carried


def detect_kind(keys, config):
  """The kind whose table matches `keys` exactly; else a ValueError naming the closest.

  When several match (a parametric FastMETRO file also fits the plain kind,
  which carries the regressor), the kind that converts the most keys wins.
  Given the state dict itself (key -> array) rather than its keys, the token
  embeddings' row counts must also be those of the kind's network (hand or
  body): a body file that lacks only its learned up-sampling layer has a hand
  network's keys, and is refused in one line.
  """
  shapes = (
      {k: np.shape(v) for k, v in keys.items()} if isinstance(keys, collections.abc.Mapping) else {}
  )
  kind = _detect_by_keys(set(keys), config)
  _check_token_rows(kind, shapes)
  return kind


def _check_token_rows(kind, shapes):
  """ValueError when a model file's token embeddings do not fit `kind`'s network."""
  scope, overrides = parse_kind(kind)
  if scope != 'model' or 'joint_token_embed.weight' not in shapes:
    return
  want = {'joint_token_embed.weight': overrides['num_joints']}
  if overrides['hand'] and 'vertex_token_embed.weight' in shapes:  # FastMETRO's
    want['vertex_token_embed.weight'] = mesh_topology.HAND_LEVELS[-1]
  got = {k: (shapes[k] or (None,))[0] for k in want}
  if got != want:
    rows = lambda d: ', '.join(f'{k} {v}' for k, v in d.items())
    network = 'hand' if overrides['hand'] else 'body'
    raise ValueError(
        f'the keys are those of {kind}, but the token embeddings are not a {network} '
        f"network's: rows {rows(got)}, expected {rows(want)}"
    )


def _detect_by_keys(keys, config):
  """The kind whose table matches `keys` exactly (see `detect_kind`)."""
  scores, exact = [], []
  for kind in candidate_kinds(config):
    missing, unexpected, carried = _mismatch(keys, kind_table(kind, config))
    if not missing and not unexpected:
      exact.append((len(carried), len(exact), kind))  # ties: candidate order
    scores.append((len(missing) + len(unexpected), kind, missing, unexpected))
  if exact:
    return min(exact)[2]
  scores.sort(key=lambda s: s[0])
  _, kind, missing, unexpected = scores[0]
  raise ValueError(
      f'the checkpoint matches no known kind; closest is {kind} with '
      f'{len(missing)} missing and {len(unexpected)} unexpected keys\n'
      + state_dict_lib.listing('missing', missing)
      + '\n'
      + state_dict_lib.listing('unexpected', unexpected)
      + '\n  pass --kind to force one, or --config for a model with other '
      'widths/stages'
  )


# ----------------------------------------------------------------------------
# Flax shapes.


def shape_topology(num_vertices=mesh_topology.SMPL_LEVELS):
  """A MeshTopology with the right level sizes and placeholder arrays.

  Parameter shapes depend only on the vertex counts, so `jax.eval_shape` of a
  model needs no real mesh files.
  """
  nv = tuple(num_vertices)
  up = len(nv) - 1
  k = mesh_topology.UPSAMPLE_NNZ
  return mesh_topology.MeshTopology(
      num_vertices=nv,
      faces=tuple(np.zeros((0, 3), np.int32) for _ in nv),
      edges=tuple(np.zeros((0, 2), np.int32) for _ in nv),
      down_indices=tuple(np.zeros(nv[l + 1], np.int32) for l in range(up)),
      up_indices=tuple(np.zeros((nv[l], k), np.int32) for l in range(up)),
      up_weights=tuple(np.zeros((nv[l], k), np.float32) for l in range(up)),
      coarse_adjacency=np.eye(nv[-1], dtype=bool),
      source='shapes only',
  )


def config_topology(config):
  """Level sizes of the config's hierarchy (placeholder arrays)."""
  hand = tables.is_hand(config.model)
  if config.topology.hierarchy:
    load = mesh_topology.load_hand_topology if hand else mesh_topology.load_topology
    return shape_topology(load(config.topology.hierarchy).num_vertices)
  return shape_topology(mesh_topology.HAND_LEVELS if hand else mesh_topology.SMPL_LEVELS)


def abstract_variables(config, scope='model', topology=None):
  """`jax.eval_shape` of the model's (or its backbone's) init: {'params', 'batch_stats'}.

  scope 'backbone' nests the backbone's variables under 'backbone', where they
  sit in the full model.
  """
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  if scope == 'backbone':
    module = models.build_backbone(config.model)
  else:
    module = models.build_model(config.model, topology or config_topology(config))
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), images)
  variables = {c: dict(v) for c, v in variables.items() if c in ('params', 'batch_stats')}
  if scope == 'backbone':
    variables = {c: {'backbone': v} for c, v in variables.items()}
  return variables
