"""`python -m coarsemetro_jax.convert`: end to end, round trips and error paths.

Uses configs/tiny.py models at the SMPL level sizes (no forward pass), so the
files are small and nothing is compiled.
"""

import collections
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import __main__ as cli
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.convert import torch_file
from coarsemetro_jax.convert import torch_writer
from configs import tiny

TINY = os.path.join(kinds.REPO_CONFIGS, 'tiny.py')


def _reference(torch, name):
  """Random tiny PyTorch reference (FastMETRO-S or CoarseMETRO) and its config."""
  from torch_reference import build
  from torch_reference import random_init

  config = tiny.get_config(name)
  mask, upsample = build.placeholder_tensors(mesh_topology.SMPL_LEVELS, config.model.num_joints)
  model = build.reference_model(config.model, mask, upsample)
  return config, random_init.randomize_(model, seed=3), (mask, upsample)


def _run(capsys, *args):
  code = cli.main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _flat(variables):
  return {
      f'{c}/{p}': np.asarray(v)
      for c in variables
      for p, v in state_dict_lib.flatten(variables[c]).items()
  }


@pytest.mark.parametrize('name', ['fastmetro', 'coarsemetro'])
def test_cli_round_trip(tmp_path, capsys, name):
  torch = pytest.importorskip('torch')
  config, reference, tensors = _reference(torch, name)
  src, out, back = tmp_path / 'model.pth', tmp_path / 'jax', tmp_path / 'back.pth'
  torch.save(reference.state_dict(), src)
  code, stdout, err = _run(capsys, '--src', src, '--out', out, '--config', f'{TINY}:{name}')
  assert code == 0, err
  assert f'{name}-S-resnet (whole model' in stdout and '| **total** |' in stdout

  # config.init_from: the orbax directory restores into the model's variables.
  target = kinds.abstract_variables(config)
  restored = _flat(orbax_variables.restore_into(out, target))
  state, _ = orbax_variables.read_state_dict(src)
  direct, _ = state_dict_lib.to_flax(state, tables.model_table(config.model), target)
  direct = _flat(direct)
  assert restored.keys() == direct.keys()
  for path, value in direct.items():
    np.testing.assert_array_equal(restored[path], value, err_msg=path)

  # Back to PyTorch without a config (the metadata names the model); a strict
  # load_state_dict into a fresh reference gives back every tensor exactly,
  # the BatchNorm counters (no Flax counterpart: carried) included.
  code, stdout, err = _run(capsys, '--to-torch', '--src', out, '--out', back)
  assert code == 0, err
  from torch_reference import build

  fresh = build.reference_model(config.model, *tensors)
  exported = torch.load(back, weights_only=True)
  assert sorted(exported) == sorted(reference.state_dict())
  if name == 'fastmetro':  # the released layout's registration order too
    assert list(exported) == list(reference.state_dict())
  fresh.load_state_dict(exported, strict=True)
  for key, value in reference.state_dict().items():
    assert fresh.state_dict()[key].dtype == value.dtype, key
    assert torch.equal(fresh.state_dict()[key], value), key
  assert int(fresh.state_dict()['backbone.1.num_batches_tracked']) == 7  # randomize_'s


def _random_variables(config, seed=0):
  """Random float32 values in the model's variable structure (with -0.0, subnormals)."""
  rng = np.random.default_rng(seed)

  def fill(leaf):
    value = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if value.size > 2:
      value.flat[0], value.flat[1] = -0.0, np.float32(1e-40)
    return value

  return jax.tree.map(fill, kinds.abstract_variables(config))


def test_flax_torch_flax_bit_exact(tmp_path):
  config = tiny.get_config('coarsemetro')
  variables = _random_variables(config)
  table = tables.model_table(config.model)
  state = state_dict_lib.to_torch(variables, table)
  torch_writer.save(state, tmp_path / 'model.pth')
  back, report = state_dict_lib.to_flax(
      torch_file.load(tmp_path / 'model.pth'), table, kinds.abstract_variables(config)
  )
  assert not report.widened
  original, back = _flat(variables), _flat(back)
  assert original.keys() == back.keys()
  for path in original:
    assert original[path].dtype == back[path].dtype
    assert original[path].tobytes() == back[path].tobytes(), path


def test_half_precision_checkpoint_is_widened():
  config = tiny.get_config('fastmetro')
  table = tables.model_table(config.model)
  state = state_dict_lib.to_torch(_random_variables(config), table)
  half = collections.OrderedDict(
      (k, v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in state.items()
  )
  variables, report = state_dict_lib.to_flax(half, table, kinds.abstract_variables(config))
  assert len(report.widened) == sum(v.dtype == np.float32 for v in state.values())
  leaf = variables['params']['conv_1x1']['kernel']
  assert leaf.dtype == np.float32
  np.testing.assert_array_equal(
      leaf, half['conv_1x1.weight'].astype(np.float32).transpose(2, 3, 1, 0)
  )


def test_backbone_only_checkpoint_merges(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  from torch_reference import random_init
  from torch_reference import resnet

  config = tiny.get_config('coarsemetro')
  net = random_init.randomize_(resnet.ResNet((1, 1, 1, 1), 8), seed=4)
  torch.save({'state_dict': net.state_dict(), 'epoch': 90}, tmp_path / 'imagenet.pth')
  code, stdout, err = _run(
      capsys,
      '--src',
      tmp_path / 'imagenet.pth',
      '--out',
      tmp_path / 'bb',
      '--config',
      f'{TINY}:coarsemetro',
  )
  assert code == 0, err
  assert "using the 'state_dict' entry" in stdout
  assert 'resnet-imagenet (backbone only' in stdout and 'fc.weight, fc.bias' in stdout
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), kinds.abstract_variables(config))
  merged = orbax_variables.restore_into(tmp_path / 'bb', zeros)
  np.testing.assert_array_equal(
      merged['params']['backbone']['conv1']['kernel'],
      net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      merged['batch_stats']['backbone']['layer4_0']['bn3']['var'],
      net.layer4[0].bn3.running_var.numpy(),
  )
  assert not np.any(merged['params']['cam_token_embed']['embedding'])  # kept
  # A backbone-only checkpoint cannot fill a FastMETRO with another backbone width.
  other = tiny.get_config('fastmetro')
  other.model.resnet_width = 16
  with pytest.raises(
      ValueError,
      match=r'mis-shaped or mis-typed \(85\): batch_stats/backbone/'
      r'bn1/mean: checkpoint \[8\] float32, model \[16\]',
  ):
    orbax_variables.restore_into(tmp_path / 'bb', kinds.abstract_variables(other))


# -------------------------------------------------------------------- errors


@pytest.fixture(name='fastmetro_file')
def _fastmetro_file(tmp_path):
  config = tiny.get_config('fastmetro')
  state = state_dict_lib.to_torch(_random_variables(config), tables.model_table(config.model))
  path = tmp_path / 'fastmetro.pth'
  torch_writer.save(state, path)
  return path, state


def _expect_failure(capsys, tmp_path, src, pattern, *extra):
  out = tmp_path / 'out'
  code, _, err = _run(capsys, '--src', src, '--out', out, *extra)
  assert code == 1
  assert pattern in err, err
  assert not out.exists()  # nothing written
  return err


def test_error_truncated_file(tmp_path, capsys, fastmetro_file):
  path, _ = fastmetro_file
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(path.read_bytes()[:-5000])
  _expect_failure(capsys, tmp_path, cut, 'cut.pth', '--config', f'{TINY}:fastmetro')


def _variant(tmp_path, state, name, edit):
  state = collections.OrderedDict(state)
  edit(state)
  path = tmp_path / f'{name}.pth'
  torch_writer.save(state, path)
  return path


def test_error_missing_key(tmp_path, capsys, fastmetro_file):
  _, state = fastmetro_file
  key = 'transformer_1.decoder.layers.0.norm3.bias'
  path = _variant(tmp_path, state, 'missing', lambda s: s.pop(key))
  err = _expect_failure(
      capsys,
      tmp_path,
      path,
      'closest is fastmetro-S-resnet with 1 missing ' 'and 0 unexpected',
      '--config',
      f'{TINY}:fastmetro',
  )
  assert key in err
  err = _expect_failure(
      capsys,
      tmp_path,
      path,
      'missing keys (in the model, not in the file) (1)',
      '--config',
      f'{TINY}:fastmetro',
      '--kind',
      'fastmetro-S-resnet',
  )
  assert key in err


def test_error_extra_key(tmp_path, capsys, fastmetro_file):
  _, state = fastmetro_file
  path = _variant(
      tmp_path,
      state,
      'extra',
      lambda s: s.update({'intermediate2fine_upsample.weight': np.zeros((3, 2))}),
  )
  _expect_failure(
      capsys,
      tmp_path,
      path,
      'unexpected keys (in the file, not in the model) (1): ' 'intermediate2fine_upsample.weight',
      '--config',
      f'{TINY}:fastmetro',
      '--kind',
      'fastmetro-S-resnet',
  )


def test_error_wrong_shape(tmp_path, capsys, fastmetro_file):
  _, state = fastmetro_file
  path = _variant(
      tmp_path,
      state,
      'shape',
      lambda s: s.update({'cam_predictor.weight': np.zeros((3, 17), np.float32)}),
  )
  _expect_failure(
      capsys,
      tmp_path,
      path,
      'cam_predictor.weight: file [3, 17], model expects ' '[3, 16]',
      '--config',
      f'{TINY}:fastmetro',
  )


def test_error_wrong_dtype(tmp_path, capsys, fastmetro_file):
  _, state = fastmetro_file
  path = _variant(
      tmp_path, state, 'dtype', lambda s: s.update({'cam_predictor.bias': np.zeros(3, np.int64)})
  )
  _expect_failure(
      capsys,
      tmp_path,
      path,
      'cam_predictor.bias: file dtype int64, model expects ' 'float32',
      '--config',
      f'{TINY}:fastmetro',
  )


def test_error_other_model_kind(tmp_path, capsys, fastmetro_file):
  path, _ = fastmetro_file
  # The file is a FastMETRO; the config builds CoarseMETRO.
  _expect_failure(
      capsys,
      tmp_path,
      path,
      'is a fastmetro-S-resnet checkpoint but --config',
      '--config',
      f'{TINY}:coarsemetro',
  )
  # Forcing an ImageNet backbone kind on it: the transformer keys are unexpected.
  err = _expect_failure(
      capsys,
      tmp_path,
      path,
      'unexpected keys (in the file, not in the model)',
      '--config',
      f'{TINY}:fastmetro',
      '--kind',
      'resnet-imagenet',
  )
  assert 'missing keys (in the model, not in the file) (' in err and 'conv1.weight' in err


def test_error_output_exists(tmp_path, capsys, fastmetro_file):
  path, _ = fastmetro_file
  (tmp_path / 'out').mkdir()
  code, _, err = _run(
      capsys, '--src', path, '--out', tmp_path / 'out', '--config', f'{TINY}:fastmetro'
  )
  assert code == 1 and 'already exists' in err
  assert not os.listdir(tmp_path / 'out')


def test_error_config_file(tmp_path, capsys, fastmetro_file, monkeypatch):
  path, _ = fastmetro_file
  _expect_failure(
      capsys, tmp_path, path, "config file 'no/such/config.py'", '--config', 'no/such/config.py'
  )
  # Without --config the default is the checkout's configs/r50.py; an installed
  # package has none, and says so.
  monkeypatch.setattr(kinds, 'REPO_CONFIGS', str(tmp_path / 'configs'))
  _expect_failure(capsys, tmp_path, path, 'no --config given')
