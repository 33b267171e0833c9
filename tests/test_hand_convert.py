"""Hand networks' conversion: both ways, kinds from the keys, body and hand never crossed.

PyTorch references with random weights (tests/test_hand_network.py's tiny
hand networks on a synthetic hierarchy of MANO's sizes) go through real
files and the command line; full-size key sets come from `jax.eval_shape` and
torch's 'meta' device.
"""

import collections
import os
import textwrap

import numpy as np
import pytest
import test_hand_network
from test_hand_network import tiny_hand_config

from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import __main__ as cli
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from configs import hand_h64
from configs import hand_r50
from configs import r50
from configs import tiny

# FastMETRO-{S,L}-{R50,H64}'s released body state dicts (keys, parameters)
# minus `coarse2intermediate_upsample` (2 keys, 1723 x 431 + 1723 = 744,336
# parameters), with 21 instead of 14 joint rows and 195 instead of 431 vertex
# rows of width 512: + 7 x 512 - 236 x 512 = -117,248 parameters.
HAND_DELTA = -744_336 - 117_248
HAND_COUNTS = {
    'S-r50': (403 - 2, 33_549_398 + HAND_DELTA),
    'L-r50': (523 - 2, 49_187_926 + HAND_DELTA),
    # HRNet's classifier (2 keys, 2,049,000 parameters) is carried, not in the table.
    'L-h64': (2161 - 2 - 2, 153_739_838 + HAND_DELTA - 2_049_000),
}


@pytest.fixture(scope='module')
def hand_topology(tmp_path_factory):
  path = tmp_path_factory.mktemp('hand') / 'hand_downsampling.npz'
  test_hand_network.write_hand_hierarchy(path)
  return mesh_topology.load_hand_topology(str(path))


def test_torch_jax_torch_round_trip_is_exact(tmp_path, hand_topology):
  torch = pytest.importorskip('torch')
  config = tiny_hand_config('fastmetro-L')
  reference = test_hand_network.random_reference(config, hand_topology, seed=5)
  state = test_hand_network.through_file(torch, reference, tmp_path / 'hand.pth')
  table = tables.model_table(config.model)
  variables, report = state_dict_lib.to_flax(
      state, table, kinds.abstract_variables(config, topology=hand_topology)
  )
  back = state_dict_lib.to_torch(variables, table, carried=report.carried)
  assert list(back) == list(reference.state_dict())  # the released registration order
  for key, value in state.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def _write_config(tmp_path, network):
  """A config file of the tiny hand network (the command line's --config)."""
  path = tmp_path / f'tiny_hand_{network}.py'
  path.write_text(textwrap.dedent(f"""
          from configs import hand_r50
          from configs import tiny

          def get_config():
            config = hand_r50.make_hand(tiny.get_config({network.split('-')[0]!r}), {network!r})
            config.model.vertex_tokens = (8, 16, 24)
            return config
          """))
  return str(path)


def _run(capsys, *args):
  code = cli.main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.mark.parametrize(
    'network, kind',
    [('fastmetro-S', 'fastmetro-S-resnet-hand'), ('coarsemetro', 'coarsemetro-S-resnet-hand')],
)
def test_command_line_round_trip(tmp_path, capsys, hand_topology, network, kind):
  torch = pytest.importorskip('torch')
  config = tiny_hand_config(network)
  reference = test_hand_network.random_reference(config, hand_topology, seed=6)
  src, out, back = tmp_path / 'hand.pth', tmp_path / 'jax', tmp_path / 'back.pth'
  torch.save(reference.state_dict(), src)
  code, stdout, err = _run(
      capsys, '--src', src, '--out', out, '--config', _write_config(tmp_path, network)
  )
  assert code == 0, err
  assert f'{kind} (whole model' in stdout
  # Back to PyTorch from the metadata alone: the same keys, order and tensors.
  code, stdout, err = _run(capsys, '--to-torch', '--src', out, '--out', back)
  assert code == 0, err
  exported = torch.load(back, weights_only=True)
  assert sorted(exported) == sorted(reference.state_dict())
  if network.startswith('fastmetro'):  # the released registration order too
    assert list(exported) == list(reference.state_dict())
  for key, value in reference.state_dict().items():
    assert torch.equal(exported[key], value), key


@pytest.mark.parametrize('size', ['S', 'M', 'L'])
@pytest.mark.parametrize('backbone', ['r50', 'h64'])
def test_full_size_kinds_are_detected_from_the_keys(size, backbone):
  kind = f'fastmetro-{size}-{backbone}-hand'
  config, scope = kinds.apply_kind(kind, r50.get_config())
  assert config.model.hand and config.model.num_joints == 21
  assert kinds.kind_of(config.model, scope) == kind
  target = kinds.abstract_variables(config)
  shapes = state_dict_lib.torch_shapes(tables.model_table(config.model), target)
  assert shapes['joint_token_embed.weight'] == (21, 512)
  assert shapes['vertex_token_embed.weight'] == (195, 512)
  assert not any(k.startswith('coarse2intermediate_upsample') for k in shapes)
  if f'{size}-{backbone}' in HAND_COUNTS:
    num_keys, num_params = HAND_COUNTS[f'{size}-{backbone}']
    params = sum(
        int(np.prod(s))
        for k, s in shapes.items()
        if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
    )
    assert (len(shapes), params) == (num_keys, num_params)
  # Zero-size stand-ins with the file's shapes: detection reads keys and shapes only.
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  assert kinds.detect_kind(state, r50.get_config()) == kind
  assert kinds.detect_kind(state, hand_h64.get_config('fastmetro-L')) == kind
  assert kinds.normalize_kind(f'FastMETRO-{size}-{backbone.upper()}-Hand') == kind


@pytest.mark.parametrize('network', ['fastmetro-S', 'fastmetro-L', 'coarsemetro'])
def test_full_size_keys_match_torch_reference(network):
  torch = pytest.importorskip('torch')
  from torch_reference import build

  config = hand_r50.get_config(network)
  target = kinds.abstract_variables(config)
  expected = state_dict_lib.torch_shapes(tables.model_table(config.model), target)
  with torch.device('meta'):
    mask, upsample = build.placeholder_tensors(mesh_topology.HAND_LEVELS, 21)
    reference = build.reference_model(config.model, mask, upsample)
  reference = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  if network.startswith('fastmetro'):  # the released registration order
    assert list(reference) == list(expected)
  assert sorted(reference) == sorted(expected)
  assert {k: reference[k] for k in expected} == dict(expected)


# ---------------------------------------------------------------------------
# A body checkpoint for a hand config, and the reverse: one clear line.


def _body_and_hand_files(tmp_path, torch, hand_topology, topology):
  body_config, hand_config = tiny.get_config('fastmetro'), tiny_hand_config('fastmetro-S')
  body = test_hand_network.through_file(
      torch, test_hand_network.random_reference(body_config, topology), tmp_path / 'body.pth'
  )
  hand = test_hand_network.through_file(
      torch, test_hand_network.random_reference(hand_config, hand_topology), tmp_path / 'hand.pth'
  )
  return (body_config, tmp_path / 'body.pth', body), (hand_config, tmp_path / 'hand.pth', hand)


def _one_line_failure(capsys, *args):
  code, _, err = _run(capsys, *args)
  assert code == 1
  assert err.startswith('error: ') and err.count('\n') == 1, err
  return err


def test_body_and_hand_checkpoints_do_not_cross(tmp_path, capsys, hand_topology, topology):
  torch = pytest.importorskip('torch')
  (body_config, body_file, body), (hand_config, hand_file, hand) = _body_and_hand_files(
      tmp_path, torch, hand_topology, topology
  )
  tiny_file = os.path.join(kinds.REPO_CONFIGS, 'tiny.py')
  hand_spec = _write_config(tmp_path, 'fastmetro-S')

  # The converter: a body file with a hand config, and a hand file with a body config.
  err = _one_line_failure(
      capsys, '--src', body_file, '--out', tmp_path / 'o1', '--config', hand_spec
  )
  assert 'is a fastmetro-S-resnet checkpoint but --config' in err and 'hand: False vs True' in err
  err = _one_line_failure(
      capsys, '--src', hand_file, '--out', tmp_path / 'o2', '--config', f'{tiny_file}:fastmetro'
  )
  assert 'is a fastmetro-S-resnet-hand checkpoint' in err and 'hand: True vs False' in err
  assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()

  # config.init_from: converted checkpoints restored into the other network.
  for src, out, spec in (
      (body_file, 'body', f'{tiny_file}:fastmetro'),
      (hand_file, 'hand', hand_spec),
  ):
    code, _, err = _run(capsys, '--src', src, '--out', tmp_path / out, '--config', spec)
    assert code == 0, err
  for directory, config, topo, got, want in (
      (tmp_path / 'body', hand_config, hand_topology, 'body', 'hand'),
      (tmp_path / 'hand', body_config, topology, 'hand', 'body'),
  ):
    with pytest.raises(ValueError) as e:
      orbax_variables.restore_into(directory, kinds.abstract_variables(config, topology=topo))
    message = str(e.value)
    assert '\n' not in message
    assert f'holds a {got} network, but the config builds a {want} network' in message

  # --to-torch with the other network's config.
  err = _one_line_failure(
      capsys,
      '--to-torch',
      '--src',
      tmp_path / 'body',
      '--out',
      tmp_path / 'b.pth',
      '--config',
      hand_spec,
  )
  assert 'holds a body network, but the config builds a hand network' in err

  # A body file without its learned up-sampling layer has a hand network's
  # keys; its token rows give it away.
  cut = collections.OrderedDict(
      (k, v) for k, v in body.items() if not k.startswith('coarse2intermediate_upsample')
  )
  with pytest.raises(ValueError) as e:
    kinds.detect_kind(cut, tiny.get_config())
  assert '\n' not in str(e.value)
  assert "fastmetro-S-resnet-hand, but the token embeddings are not a hand network's" in str(
      e.value
  )
  assert 'joint_token_embed.weight 14, vertex_token_embed.weight 431' in str(e.value)
  assert kinds.detect_kind(hand, tiny.get_config()) == 'fastmetro-S-resnet-hand'
