"""Parametric FastMETRO-L-H64: key accounting, PyTorch parity and a lossless round trip.

The PyTorch side is torch_reference's FastMETRO with its HRNet backbone and
the SMPL-parameter regressor attached as FastMETRO registers it (last, as
`smpl_parameter_regressor`). Keys and shapes are checked on the real
FastMETRO-L-H64 (torch 'meta' device, nothing computed); the forward parity
runs a CPU-sized HRNet and narrow transformer widths; the round trip
PyTorch -> JAX -> PyTorch goes through the command line on the real
FastMETRO-L-H64 shapes (a ~650 MB file, no forward pass).
"""

import jax
import numpy as np
import pytest
import test_convert_parity

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import __main__ as cli
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables as checkpoint
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.models import fastmetro
from coarsemetro_jax.models import hrnet
from configs import fastmetro as fastmetro_config
from configs import r50

torch = pytest.importorskip('torch')
from torch_reference import build
from torch_reference import fastmetro as torch_fastmetro
from torch_reference import hrnet as torch_hrnet
from torch_reference import random_init
from torch_reference import smpl_param_regressor as torch_spr

KIND = 'fastmetro-L-h64-smplparam'
# FastMETRO-L-H64's released state dict (2161 keys, 153,739,838 parameters)
# plus the regressor's 37 keys and 9,734,370 parameters.
KEYS, PARAMS = 2161 + 37, 153_739_838 + 9_734_370
TOLERANCE = 1e-5  # max abs difference, float32
# A CPU-sized HRNet with every structural feature (tests/test_hrnet.py's SMALL).
SMALL_HRNET = dict(
    stem_width=16,
    stage_modules=(1, 2, 1),
    num_blocks=2,
    head_channels=(8, 16, 32, 64),
    final_channels=64,
)


def parametric_reference(model_config, mask, upsample, hrnet_structure=None):
  """FastMETRO (HRNet backbone) with the regressor, in PyTorch.

  `forward` returns FastMETRO's outputs plus pred_rotmat and pred_betas of
  the regressor on the intermediate mesh, as the released forward does.
  """
  m = model_config
  backbone = torch_hrnet.HRNet(m.hrnet_width, **(hrnet_structure or {}))
  model = torch_fastmetro.FastMETRO(
      backbone,
      backbone.out_channels,
      mask,
      upsample,
      num_layers=m.fastmetro_layers,
      dims=tuple(m.fastmetro_dims),
      ffn_dims=tuple(m.fastmetro_ffn_dims),
      heads=m.num_heads,
      num_joints=m.num_joints,
      dropout=m.dropout,
  )
  model.smpl_parameter_regressor = torch_spr.SMPLParameterRegressor(upsample.shape[1])
  return model


def forward(model, images):
  with torch.no_grad():
    out = model(images)
    out['pred_rotmat'], out['pred_betas'] = model.smpl_parameter_regressor(
        out['pred_3d_vertices_intermediate']
    )
  return out


def _param_count(shapes):
  return sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )


def test_l_h64_parametric_keys_and_detection():
  config, _ = kinds.apply_kind(KIND, r50.get_config())
  assert config.model.smpl_param_regressor and kinds.kind_of(config.model) == KIND
  assert kinds.normalize_kind('FastMETRO-L-H64-SMPLPARAM') == KIND
  with torch.device('meta'):
    mask, upsample = build.placeholder_tensors(mesh_topology.SMPL_LEVELS, 14)
    reference = parametric_reference(config.model, mask, upsample)
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert len(shapes) == KEYS and _param_count(shapes) == PARAMS

  table = tables.model_table(config.model)
  target = kinds.abstract_variables(config)
  expected = state_dict_lib.torch_shapes(table, target)
  # Every Flax leaf is filled once; the only source keys left over are carried.
  leaves, _ = tables.expand(table)
  assert len(leaves) == sum(len(state_dict_lib.flatten(target[c])) for c in target)
  assert set(shapes) - set(expected) == {'backbone.classifier.weight', 'backbone.classifier.bias'}
  assert tables.carried_modules(table) == ['backbone.classifier']
  assert {k: shapes[k] for k in expected} == dict(expected)
  assert list(expected) == [k for k in shapes if k in expected]  # state-dict order
  assert expected['smpl_parameter_regressor.regressor.0.fc_block.0.weight'] == (1024, 5169)
  # The file is recognised from its keys; without the regressor it is the plain kind.
  assert kinds.detect_kind(list(shapes), r50.get_config()) == KIND
  plain = [k for k in shapes if not k.startswith('smpl_parameter_regressor.')]
  assert kinds.detect_kind(plain, r50.get_config()) == 'fastmetro-L-h64'
  # Forced to the plain kind, the regressor is carried (optional), not dropped.
  plain_table = tables.model_table(fastmetro_config.get_config('L-h64').model)
  assert (
      tables.carrying_module('smpl_parameter_regressor.regressor.3.bias', plain_table)
      == 'smpl_parameter_regressor'
  )


def test_parametric_parity_small(tmp_path):
  """FastMETRO-L with a small HRNet and the head: converted weights give PyTorch's outputs."""
  config = fastmetro_config.get_config('L-h64')
  m = config.model
  m.smpl_param_regressor = True
  m.hrnet_width, m.fastmetro_dims, m.fastmetro_ffn_dims, m.num_heads = 8, (32, 16), (64, 32), 4
  topology = test_convert_parity.synthetic_topology()
  mask, upsample = build.topology_tensors(topology, m.num_joints)
  reference = random_init.randomize_(
      parametric_reference(m, mask, upsample, SMALL_HRNET), seed=3
  ).eval()
  torch.save(reference.state_dict(), tmp_path / 'model.pth')
  state, _ = checkpoint.read_state_dict(tmp_path / 'model.pth')

  model = fastmetro.FastMETRO(
      backbone=hrnet.HRNet(width=8, **SMALL_HRNET),
      topology=topology,
      num_layers=3,
      dims=(32, 16),
      ffn_dims=(64, 32),
      num_heads=4,
      smpl_param_regressor=True,
  )
  images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images[:1])
  table = tables.hrnet_backbone_table(8, 'backbone.', 'backbone/', **SMALL_HRNET) + tables.Table(
      [r for r in tables.model_table(m).rows if not r.torch.startswith('backbone.')]
  )
  assert 'smpl_parameter_regressor.regressor.3' in [r.torch for r in table.rows]
  variables, report = state_dict_lib.to_flax(
      state, table, {c: target[c] for c in ('params', 'batch_stats')}
  )
  assert not report.ignored
  assert [k for k in report.carried if not k.endswith('num_batches_tracked')] == [
      'backbone.classifier.weight',
      'backbone.classifier.bias',
  ]

  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  expected = forward(reference, torch.from_numpy(images).permute(0, 3, 1, 2))
  for name in (
      'pred_cam',
      'pred_3d_joints',
      'pred_3d_vertices_intermediate',
      'pred_3d_vertices_fine',
      'pred_rotmat',
      'pred_betas',
  ):
    got, want = np.asarray(out[name]), expected[name].numpy()
    assert got.shape == want.shape, name
    assert np.abs(want).max() > 0.1, name
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=name)
  assert out['pred_rotmat'].shape == (2, 24, 3, 3) and out['pred_betas'].shape == (2, 10)


@pytest.mark.slow
def test_l_h64_parametric_round_trip_is_lossless(tmp_path, capsys):
  """PyTorch file -> orbax -> PyTorch file: the same keys (and order), every tensor equal."""
  config, _ = kinds.apply_kind(KIND, r50.get_config())
  mask, upsample = build.placeholder_tensors(mesh_topology.SMPL_LEVELS, 14)
  reference = random_init.randomize_(parametric_reference(config.model, mask, upsample), seed=5)
  src, out, back = tmp_path / 'l_h64.pth', tmp_path / 'jax', tmp_path / 'back.pth'
  torch.save(reference.state_dict(), src)
  del reference  # ~650 MB; compared below against the file, memory-mapped

  assert cli.main(['--src', str(src), '--out', str(out)]) == 0
  stdout = capsys.readouterr().out
  assert f'{KIND} (whole model' in stdout
  assert 'carried 2 source tensors with no Flax counterpart' in stdout
  assert cli.main(['--to-torch', '--src', str(out), '--out', str(back)]) == 0
  assert 'note:' not in capsys.readouterr().out

  original = torch.load(src, weights_only=True, mmap=True)
  exported = torch.load(back, weights_only=True, mmap=True)
  assert list(exported) == list(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
  assert int(exported['backbone.bn1.num_batches_tracked']) == 7  # randomize_'s counters
  with torch.device('meta'):
    fresh = parametric_reference(config.model, mask, upsample)
  fresh.load_state_dict(exported, strict=True, assign=True)
