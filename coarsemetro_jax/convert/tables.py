"""Conversion tables: PyTorch state-dict keys <-> Flax variable paths, per model.

A table is a list of module rows `Row(kind, torch, flax)`; every row expands
into parameter leaves with a fixed layout (`expand`):

  kind         torch keys (under `torch.`)               Flax leaves (under `flax/`)
  conv         weight [O, I, kh, kw]                      params kernel [kh, kw, I, O]
  conv_bias    weight, bias                               params kernel, bias
  linear       weight [out, in], bias                     params kernel [in, out] (= W.T), bias
  embedding    weight [N, D]                              params embedding [N, D]
  layer_norm   weight, bias                               params scale, bias
  batch_norm   weight, bias, running_mean, running_var    params scale, bias; batch_stats mean, var
               (num_batches_tracked: read and ignored; written as 0)
  mha          in_proj_weight [3E, E], in_proj_bias,      params in_proj/kernel [E, 3E] (q|k|v
               out_proj.weight, out_proj.bias             column blocks, kept packed), in_proj/bias,
                                                          out_proj/kernel, out_proj/bias
  carried      every key under the module                 none: the tensors travel unchanged with
                                                          the converted checkpoint and are written
                                                          back at this row's place by `to_torch`
  optional     as carried, for a module only some files   none
               have (FastMETRO's regressor, plain kind)

Nothing is dropped silently: a source key is converted, carried (its module
has no Flax counterpart: HRNet's `classifier`, torchvision's `fc`, FastMETRO's
SMPL-parameter regressor on a model without the head; BatchNorm
`num_batches_tracked` counters) or listed in `Table.ignored`, so that a
PyTorch -> JAX -> PyTorch round trip gives back the same keys and tensors.

Module names follow one rule, `flax_name`: a numeric component joins the one
before it (`transformer_1.encoder.layers.0.self_attn` ->
`transformer_1/encoder/layers_0/self_attn`); the only exception is FastMETRO's
`nn.Sequential` ResNet (`backbone.0` = conv1, `.1` = bn1, `.4`-`.7` =
layer1-4), which the ResNet rows spell out.

FastMETRO's released state dicts (`FastMETRO_Body_Network`, no `module.`
prefix) map key for key onto models/fastmetro.py, the parametric checkpoints'
`smpl_parameter_regressor.*` onto its SMPL-parameter head
(`config.model.smpl_param_regressor`; `smpl_param_table`). The hand
network's state dicts (`FastMETRO_Hand_Network`, config.model.hand) have the
same keys without `coarse2intermediate_upsample` (it up-samples with a fixed
matrix), with 21 joint and 195 vertex token rows; CoarseMETRO-Hand's likewise
drop that layer. CoarseMETRO has no released PyTorch code; its PyTorch layout
is defined here, in FastMETRO's naming style, from the Flax module names of
models/coarsemetro.py (S stages, s = 1..S; E_s = stage_dims):

  backbone.*                          as FastMETRO (ResNet-50: backbone.0/.1/.4-.7)
  conv_1x1.{weight,bias}              Conv2d(C_backbone -> E_1, 1x1)
  cam_token_embed.weight              Embedding(1, E_1)
  joint_token_embed.weight            Embedding(14, E_1)
  vertex_token_init.{weight,bias}     Linear(14 -> V_1) along the token axis
  transformer_s.encoder.layers.0.*    FastMETRO encoder layer (self_attn, linear1/2, norm1/2)
  transformer_s.encoder.norm.*
  transformer_s.decoder.layers.0.*    FastMETRO decoder layer (self_attn, multihead_attn,
                                      linear1/2, norm1-3) plus, unless
                                      vertex_attention == 'none', vertex_attn
                                      (MultiheadAttention), norm_vertex, norm_vertex_memory
  transformer_s.decoder.norm.*
  dim_reduce_enc_cam.k.*, dim_reduce_enc_img.k.*, dim_reduce_dec.k.*
                                      nn.ModuleList of Linear(E_{k+1} -> E_{k+2}), one entry
                                      per stage transition k whose width changes
  vertex_upsample.k.{weight,bias}     nn.ModuleList: Linear(V_{k+1} -> V_{k+2}) along the
                                      token axis, k = 0..S-1 (the last maps V_S -> 431,
                                      or 195 for the hand, on xyz coordinates)
  cam_predictor.*, xyz_regressor.*    Linear(E_S -> 3)
  coarse2intermediate_upsample.*      Linear(431 -> 1723) along the vertex axis (body only)
  smpl_parameter_regressor.*          with config.model.smpl_param_regressor: FastMETRO's
                                      SMPL-parameter regressor on the 1723 mesh

Backbones: `backbone_table` returns the table of `config.model.backbone`:
torchvision's ResNet (`resnet_table`) or HRNet (`hrnet_backbone_table`, from
the module listing in hrnet_table.py).
"""

import dataclasses
import re

import numpy as np

from coarsemetro_jax.convert import hrnet_table
from coarsemetro_jax.convert import smpl_param_table as smpl_param_listing

ROW_KINDS = (
    'conv',
    'conv_bias',
    'linear',
    'embedding',
    'layer_norm',
    'batch_norm',
    'mha',
    'carried',
    'optional',
)
CARRIED_KINDS = ('carried', 'optional')  # rows with no Flax counterpart

# Layouts: torch array -> Flax array, and back.
TO_FLAX = {
    'copy': lambda w: w,
    'linear': lambda w: w.T,  # [out, in] -> [in, out]
    'conv': lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
}
TO_TORCH = {
    'copy': lambda w: w,
    'linear': lambda w: w.T,
    'conv': lambda w: w.transpose(3, 2, 0, 1),  # HWIO -> OIHW
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One PyTorch module and the Flax module it becomes."""

  kind: str
  torch: str  # dotted module path, e.g. 'transformer_1.encoder.norm'
  flax: str  # '/'-joined Flax module path ('' for a carried row)

  def __post_init__(self):
    if self.kind not in ROW_KINDS:
      raise ValueError(f'unknown row kind {self.kind!r}; one of {ROW_KINDS}')


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One tensor: torch key <-> (collection, Flax path) with a layout."""

  torch: str
  collection: str  # 'params' | 'batch_stats'
  flax: str
  layout: str  # key of TO_FLAX / TO_TORCH


@dataclasses.dataclass
class Table:
  """Rows plus the source keys that are deliberately dropped.

  `ignored` holds exact keys or prefixes ending in '.'; they may be absent
  from a checkpoint (no table lists any today: keys without a Flax
  counterpart are carried rows). `num_batches_tracked` buffers are always
  optional; when present they are carried.
  """

  rows: list[Row]
  ignored: list[str] = dataclasses.field(default_factory=list)

  def __add__(self, other):
    return Table(self.rows + other.rows, self.ignored + other.ignored)


def flax_name(torch_module):
  """'a.b.0.c' -> 'a/b_0/c' (numeric components join the previous name)."""
  parts = []
  for part in torch_module.split('.'):
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return '/'.join(parts)


def row(kind, torch_module, flax_module=None):
  if kind in CARRIED_KINDS:
    return Row(kind, torch_module, '')
  return Row(kind, torch_module, flax_module or flax_name(torch_module))


def _join(prefix, name):
  return f'{prefix}{name}' if not prefix or prefix.endswith(('.', '/')) else f'{prefix}.{name}'


def expand(table):
  """Rows -> leaves (in table order) and the optional num_batches_tracked keys."""
  leaves, ignorable = [], []
  for r in table.rows:
    row_leaves, row_ignorable = expand_row(r)
    leaves += row_leaves
    ignorable += row_ignorable
  return leaves, ignorable


def expand_row(r):
  """One row's leaves and its num_batches_tracked key (a carried row has none)."""
  leaves, ignorable = [], []
  t = lambda name: f'{r.torch}.{name}'
  f = lambda name: f'{r.flax}/{name}'
  if r.kind in ('conv', 'conv_bias'):
    leaves.append(Leaf(t('weight'), 'params', f('kernel'), 'conv'))
    if r.kind == 'conv_bias':
      leaves.append(Leaf(t('bias'), 'params', f('bias'), 'copy'))
  elif r.kind == 'linear':
    leaves += [
        Leaf(t('weight'), 'params', f('kernel'), 'linear'),
        Leaf(t('bias'), 'params', f('bias'), 'copy'),
    ]
  elif r.kind == 'embedding':
    leaves.append(Leaf(t('weight'), 'params', f('embedding'), 'copy'))
  elif r.kind == 'layer_norm':
    leaves += [
        Leaf(t('weight'), 'params', f('scale'), 'copy'),
        Leaf(t('bias'), 'params', f('bias'), 'copy'),
    ]
  elif r.kind == 'batch_norm':
    leaves += [
        Leaf(t('weight'), 'params', f('scale'), 'copy'),
        Leaf(t('bias'), 'params', f('bias'), 'copy'),
        Leaf(t('running_mean'), 'batch_stats', f('mean'), 'copy'),
        Leaf(t('running_var'), 'batch_stats', f('var'), 'copy'),
    ]
    ignorable.append(t('num_batches_tracked'))
  elif r.kind == 'mha':
    leaves += [
        Leaf(t('in_proj_weight'), 'params', f('in_proj/kernel'), 'linear'),
        Leaf(t('in_proj_bias'), 'params', f('in_proj/bias'), 'copy'),
        Leaf(t('out_proj.weight'), 'params', f('out_proj/kernel'), 'linear'),
        Leaf(t('out_proj.bias'), 'params', f('out_proj/bias'), 'copy'),
    ]
  return leaves, ignorable


def is_ignored(key, table):
  return any(key == p or (p.endswith('.') and key.startswith(p)) for p in table.ignored)


# ----------------------------------------------------------------------------
# Backbones.


def resnet_table(depths, width, torch_prefix='', flax_prefix='', sequential=False):
  """torchvision ResNet (Bottleneck, v1.5) without avgpool/fc.

  sequential=True names the modules as FastMETRO's
  `nn.Sequential(*resnet.children()[:-2])`: 0 = conv1, 1 = bn1, 4..7 = layer1..4.
  """
  names = {'conv1': '0', 'bn1': '1'} if sequential else {'conv1': 'conv1', 'bn1': 'bn1'}
  t = lambda name: _join(torch_prefix, name)
  f = lambda name: _join(flax_prefix, name)
  rows = [row('conv', t(names['conv1']), f('conv1')), row('batch_norm', t(names['bn1']), f('bn1'))]
  in_channels = width
  for i, depth in enumerate(depths):
    planes = width * 2**i
    layer = str(4 + i) if sequential else f'layer{i + 1}'
    for j in range(depth):
      tb, fb = t(f'{layer}.{j}'), f(f'layer{i + 1}_{j}')
      for k in (1, 2, 3):
        rows += [
            row('conv', f'{tb}.conv{k}', f'{fb}/conv{k}'),
            row('batch_norm', f'{tb}.bn{k}', f'{fb}/bn{k}'),
        ]
      stride = 2 if (j == 0 and i > 0) else 1
      if j == 0 and (stride != 1 or in_channels != planes * 4):
        rows += [
            row('conv', f'{tb}.downsample.0', f'{fb}/downsample_0'),
            row('batch_norm', f'{tb}.downsample.1', f'{fb}/downsample_1'),
        ]
      in_channels = planes * 4
  return Table(rows)


def hrnet_backbone_table(width, torch_prefix='', flax_prefix='', **structure):
  """HRNet-W{width} (`models/hrnet.HRNet` fields width, **structure); classifier carried."""
  rows = [
      row(kind, _join(torch_prefix, m), _join(flax_prefix, flax_name(m)))
      for m, kind in hrnet_table.module_rows(width, **structure)
  ]
  return Table(rows + [row('carried', _join(torch_prefix, 'classifier'))])


def backbone_table(model_config, torch_prefix, flax_prefix, imagenet=False):
  """Table of `model_config.backbone`.

  Args:
    model_config: `config.model`.
    torch_prefix: 'backbone.' inside FastMETRO/CoarseMETRO, '' for an ImageNet file.
    flax_prefix: Flax path of the backbone module ('backbone/').
    imagenet: the source is the backbone's own ImageNet classification file
      (torchvision layout, its classifier `fc` carried).
  """
  name = model_config.backbone
  if name in ('resnet50', 'resnet'):
    depths = (3, 4, 6, 3) if name == 'resnet50' else tuple(model_config.resnet_depths)
    width = 64 if name == 'resnet50' else model_config.resnet_width
    table = resnet_table(depths, width, torch_prefix, flax_prefix, sequential=not imagenet)
    if imagenet:
      table += Table([row('carried', _join(torch_prefix, 'fc'))])
    return table
  if name == 'hrnet':
    return hrnet_backbone_table(model_config.hrnet_width, torch_prefix, flax_prefix)
  raise ValueError(f'no conversion table for backbone {name!r}')


# ----------------------------------------------------------------------------
# Transformers and full models.


def transformer_table(name, num_layers, vertex_attention='none'):
  """FastMETRO's `Transformer` (encoder + decoder), CoarseMETRO's stage block."""
  rows = []
  for i in range(num_layers):
    p = f'{name}.encoder.layers.{i}'
    rows += [
        row('mha', f'{p}.self_attn'),
        row('linear', f'{p}.linear1'),
        row('linear', f'{p}.linear2'),
        row('layer_norm', f'{p}.norm1'),
        row('layer_norm', f'{p}.norm2'),
    ]
  rows.append(row('layer_norm', f'{name}.encoder.norm'))
  for i in range(num_layers):
    p = f'{name}.decoder.layers.{i}'
    rows += [row('mha', f'{p}.self_attn'), row('mha', f'{p}.multihead_attn')]
    if vertex_attention != 'none':
      rows.append(row('mha', f'{p}.vertex_attn'))
    rows += [
        row('linear', f'{p}.linear1'),
        row('linear', f'{p}.linear2'),
        row('layer_norm', f'{p}.norm1'),
        row('layer_norm', f'{p}.norm2'),
        row('layer_norm', f'{p}.norm3'),
    ]
    if vertex_attention != 'none':
      rows += [row('layer_norm', f'{p}.norm_vertex'), row('layer_norm', f'{p}.norm_vertex_memory')]
  rows.append(row('layer_norm', f'{name}.decoder.norm'))
  return Table(rows)


def smpl_param_table(
    torch_prefix=smpl_param_listing.TORCH_PREFIX, flax_prefix=smpl_param_listing.FLAX_PREFIX
):
  """FastMETRO's SMPL-parameter regressor (convert/smpl_param_table.py).

  Args:
    torch_prefix: prefix of the regressor's keys ('' for its own state dict).
    flax_prefix: Flax path of the `SMPLParamRegressor` module ('' when it is
      the top-level module).
  """
  return Table(
      [
          row(kind, _join(torch_prefix, m), _join(flax_prefix, flax_name(m)))
          for m, kind in smpl_param_listing.module_rows()
      ]
  )


def smpl_param_head(model_config):
  """The SMPL-parameter head's rows when `config.model.smpl_param_regressor` is on.

  When it is off, FastMETRO's released regressor (a checkpoint of the
  parametric model converted for the plain one) is carried; the plain
  FastMETRO files lack it, and a CoarseMETRO file never has it without the
  flag.
  """
  if model_config.get('smpl_param_regressor', False):
    return smpl_param_table()
  if model_config.name == 'fastmetro' and not is_hand(model_config):
    return Table([row('optional', smpl_param_listing.TORCH_PREFIX.rstrip('.'))])
  return Table([])


def is_hand(model_config):
  """The hand network (`config.model.hand`; absent in older configs and metadata = body)."""
  return bool(model_config.get('hand', False))


def learned_upsample(model_config):
  """The body networks' learned 431 -> 1723 layer; the hand networks have none."""
  return [] if is_hand(model_config) else [row('linear', 'coarse2intermediate_upsample')]


def fastmetro_table(model_config):
  """`FastMETRO_Body_Network` (or `_Hand_Network`) in its registration (state-dict) order."""
  table = backbone_table(model_config, 'backbone.', 'backbone/')
  for t in (1, 2):
    table += transformer_table(f'transformer_{t}', model_config.fastmetro_layers)
  table += Table(
      [row('linear', n) for n in ('dim_reduce_enc_cam', 'dim_reduce_enc_img', 'dim_reduce_dec')]
      + [
          row('embedding', n)
          for n in ('cam_token_embed', 'joint_token_embed', 'vertex_token_embed')
      ]
      + [
          row('linear', 'xyz_regressor'),
          row('linear', 'cam_predictor'),
          row('conv_bias', 'conv_1x1'),
      ]
      + learned_upsample(model_config)
  )
  return table + smpl_param_head(model_config)


def coarsemetro_table(model_config):
  """CoarseMETRO's PyTorch layout (module docstring), in forward order."""
  dims = tuple(model_config.stage_dims)
  table = backbone_table(model_config, 'backbone.', 'backbone/')
  table += Table(
      [
          row('conv_bias', 'conv_1x1'),
          row('embedding', 'cam_token_embed'),
          row('embedding', 'joint_token_embed'),
          row('linear', 'vertex_token_init'),
      ]
  )
  for s in range(len(dims)):
    if s > 0:
      if dims[s] != dims[s - 1]:
        table += Table(
            [
                row('linear', f'{n}.{s - 1}')
                for n in ('dim_reduce_enc_cam', 'dim_reduce_enc_img', 'dim_reduce_dec')
            ]
        )
      table += Table([row('linear', f'vertex_upsample.{s - 1}')])
    table += transformer_table(f'transformer_{s + 1}', 1, model_config.vertex_attention)
  table += Table(
      [
          row('linear', 'cam_predictor'),
          row('linear', 'xyz_regressor'),
          row('linear', f'vertex_upsample.{len(dims) - 1}'),
      ]
      + learned_upsample(model_config)
  )
  return table + smpl_param_head(model_config)


def model_table(model_config, scope='model'):
  """Table of the whole model (scope 'model') or of its backbone's ImageNet file."""
  if scope == 'backbone':
    return backbone_table(model_config, '', 'backbone/', imagenet=True)
  if model_config.name == 'fastmetro':
    return fastmetro_table(model_config)
  if model_config.name == 'coarsemetro':
    return coarsemetro_table(model_config)
  raise ValueError(f'no conversion table for model {model_config.name!r}')


def torch_keys(table):
  """The state-dict keys a table converts (optional and carried keys excluded)."""
  return [leaf.torch for leaf in expand(table)[0]]


def carried_modules(table, kinds=CARRIED_KINDS):
  """Torch module paths of the carried (and optional) rows, in table order."""
  return [r.torch for r in table.rows if r.kind in kinds]


def carrying_module(key, table):
  """The carried module (row) that `key` belongs to, or None."""
  for module in carried_modules(table):
    if key == module or key.startswith(module + '.'):
      return module
  return None


def check_table(table):
  """Every torch key and every Flax path appears once, and no carried module
  holds a converted key (a table-writing guard)."""
  leaves, _ = expand(table)
  for attr in ('torch', 'flax'):
    names = [
        getattr(leaf, attr) if attr == 'torch' else (leaf.collection, leaf.flax) for leaf in leaves
    ]
    dup = sorted({str(n) for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f'conversion table maps {attr} names more than once: {dup[:5]}')
  overlap = [leaf.torch for leaf in leaves if carrying_module(leaf.torch, table)]
  if overlap:
    raise ValueError(f'conversion table both converts and carries: {overlap[:5]}')


def natural_key(name):
  """Sort key with numbers compared numerically ('layers.10' after 'layers.9')."""
  return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', name)]


def num_params(shape):
  return int(np.prod(shape, dtype=np.int64))
