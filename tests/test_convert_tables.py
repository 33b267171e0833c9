"""Conversion tables against full-size models, without running them.

Flax shapes come from `jax.eval_shape`, PyTorch shapes from the reference
models instantiated on torch's 'meta' device (no memory, no compute).
"""

import numpy as np
import pytest

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from configs import fastmetro as fastmetro_config
from configs import r50
from configs import tiny


def _meta_state_shapes(torch, model_config):
  from torch_reference import build

  with torch.device('meta'):
    mask, upsample = build.placeholder_tensors(mesh_topology.SMPL_LEVELS, model_config.num_joints)
    model = build.reference_model(model_config, mask, upsample)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _param_count(shapes):
  return sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )


def test_flax_name_rule():
  assert (
      tables.flax_name('transformer_1.encoder.layers.0.self_attn')
      == 'transformer_1/encoder/layers_0/self_attn'
  )
  assert tables.flax_name('layer1.0.downsample.1') == 'layer1_0/downsample_1'
  assert tables.flax_name('vertex_upsample.2') == 'vertex_upsample_2'


def test_layouts_are_inverse():
  rng = np.random.default_rng(0)
  for layout, shape in (('linear', (5, 3)), ('conv', (8, 3, 7, 5)), ('copy', (4,))):
    w = rng.standard_normal(shape)
    np.testing.assert_array_equal(tables.TO_TORCH[layout](tables.TO_FLAX[layout](w)), w)
  w = rng.standard_normal((8, 3, 7, 5))  # OIHW
  assert tables.TO_FLAX['conv'](w)[6, 4, 2, 7] == w[7, 2, 6, 4]  # HWIO


# FastMETRO's released state dicts: (keys, parameters) per variant.
FASTMETRO_COUNTS = {'S': (403, 33_549_398), 'M': (463, 41_368_662), 'L': (523, 49_187_926)}


@pytest.mark.parametrize('size', ['S', 'M', 'L'])
def test_fastmetro_r50_full_size_accounting(size):
  config = fastmetro_config.get_config(f'{size}-r50')
  target = kinds.abstract_variables(config)
  table = tables.model_table(config.model)
  shapes = state_dict_lib.torch_shapes(table, target)
  # Every Flax leaf is covered exactly once.
  flat = state_dict_lib.flatten(target['params']).keys() | {
      f'stats:{p}' for p in state_dict_lib.flatten(target['batch_stats'])
  }
  leaves, _ = tables.expand(table)
  assert len(leaves) == len(flat)
  keys, params = FASTMETRO_COUNTS[size]
  assert len(shapes) == keys and _param_count(shapes) == params
  assert shapes['transformer_1.encoder.layers.0.self_attn.in_proj_weight'] == (1536, 512)
  assert shapes['transformer_2.decoder.layers.0.multihead_attn.out_proj.weight'] == (128, 128)
  assert shapes['conv_1x1.weight'] == (512, 2048, 1, 1)
  assert shapes['coarse2intermediate_upsample.weight'] == (1723, 431)
  assert shapes['vertex_token_embed.weight'] == (431, 512)
  assert shapes['backbone.7.2.conv3.weight'] == (2048, 512, 1, 1)
  assert shapes['backbone.4.0.downsample.1.running_var'] == (256,)


@pytest.mark.parametrize('model', ['fastmetro-S', 'fastmetro-L', 'coarsemetro'])
def test_full_size_keys_match_torch_reference(model):
  torch = pytest.importorskip('torch')
  if model == 'coarsemetro':
    config = r50.get_config()
  else:
    config = fastmetro_config.get_config(f'{model[-1]}-r50')
  target = kinds.abstract_variables(config)
  expected = state_dict_lib.torch_shapes(tables.model_table(config.model), target)
  reference = _meta_state_shapes(torch, config.model)
  assert sorted(reference) == sorted(expected)
  assert {k: reference[k] for k in expected} == dict(expected)


def test_resnet50_imagenet_accounting():
  torch = pytest.importorskip('torch')
  from torch_reference import resnet

  with torch.device('meta'):
    reference = {k: tuple(v.shape) for k, v in resnet.ResNet().state_dict().items()}
  config, scope = kinds.apply_kind('resnet50-imagenet', r50.get_config())
  table = tables.model_table(config.model, scope)
  expected = state_dict_lib.torch_shapes(table, kinds.abstract_variables(config, scope))
  assert set(reference) - set(expected) == {'fc.weight', 'fc.bias'}
  assert all(tables.carrying_module(k, table) == 'fc' for k in ('fc.weight', 'fc.bias'))
  assert {k: reference[k] for k in expected} == dict(expected)
  assert _param_count(expected) == 23_508_032  # FastMETRO-*-R50's backbone parameters


@pytest.mark.parametrize('vertex_attention', ['none', 'beginning'])
def test_coarsemetro_variants_accounting(vertex_attention):
  config = tiny.get_config()
  config.model.vertex_attention = vertex_attention
  config.model.stage_dims = (32, 32, 16)  # only the second transition reduces
  target = kinds.abstract_variables(config)
  table = tables.model_table(config.model)
  shapes = state_dict_lib.torch_shapes(table, target)
  leaves, _ = tables.expand(table)
  n_flax = sum(len(state_dict_lib.flatten(target[c])) for c in target)
  assert len(leaves) == n_flax
  assert ('transformer_2.decoder.layers.0.vertex_attn.in_proj_weight' in shapes) == (
      vertex_attention != 'none'
  )
  assert 'dim_reduce_dec.1.weight' in shapes and 'dim_reduce_dec.0.weight' not in shapes
  assert shapes['vertex_upsample.2.weight'] == (431, 384)
  assert shapes['vertex_token_init.weight'] == (48, 14)


def _keys(config, kind):
  kind_config, scope = kinds.apply_kind(kind, config)
  return tables.torch_keys(tables.model_table(kind_config.model, scope))


@pytest.mark.parametrize(
    'kind',
    [
        'resnet50-imagenet',
        'fastmetro-S-r50',
        'fastmetro-M-r50',
        'fastmetro-L-r50',
        'coarsemetro-S-r50',
    ],
)
def test_detect_kind(kind):
  config = r50.get_config()
  keys = _keys(config, kind)
  extra = {
      'resnet50-imagenet': ['fc.weight', 'fc.bias', 'bn1.num_batches_tracked'],
      'fastmetro-S-r50': ['smpl_parameter_regressor.regressor.3.weight'],
  }.get(kind, [])
  assert kinds.detect_kind(keys + extra, config) == kind


def test_detect_kind_names_closest():
  config = r50.get_config()
  keys = _keys(config, 'fastmetro-M-r50')
  keys.remove('transformer_1.encoder.layers.1.linear1.weight')
  keys.append('my_head.weight')
  with pytest.raises(
      ValueError,
      match=r'closest is fastmetro-M-r50 with 1 missing and 1 ' r'unexpected(.|\n)*my_head.weight',
  ):
    kinds.detect_kind(keys, config)


def test_kind_names_round_trip():
  for kind in (
      'resnet50-imagenet',
      'fastmetro-S-r50',
      'fastmetro-L-h64',
      'coarsemetro-S-r50',
      'hrnet-w64-imagenet',
  ):
    config, scope = kinds.apply_kind(kind, r50.get_config())
    assert kinds.kind_of(config.model, scope) == kind
  assert kinds.apply_kind('FastMETRO-L-H64', r50.get_config())[0].model.fastmetro_layers == 3
  assert kinds.normalize_kind('FastMETRO-S-R50') == 'fastmetro-S-r50'
  with pytest.raises(ValueError, match='unknown checkpoint kind'):
    kinds.parse_kind('fastmetro-XL-r50')


def test_duplicate_rows_rejected():
  table = tables.Table([tables.row('linear', 'a'), tables.row('linear', 'a')])
  with pytest.raises(ValueError, match='more than once'):
    tables.check_table(table)
