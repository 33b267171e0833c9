"""Hand networks: the 778 / 195 topology, FastMETRO-Hand and CoarseMETRO-Hand against PyTorch.

The PyTorch side is torch_reference/fastmetro_hand.py (FastMETRO_Hand_Network
written from its description) and torch_reference/coarsemetro.py's hand mode,
with random weights; checkpoints go through real files. Narrow widths and a
tiny backbone on a synthetic plain-layout hand hierarchy of MANO's sizes keep
the forward passes cheap; the full-size recipes are built with
`jax.eval_shape`. Tests on MANO's real topology files skip when those are
absent (tests/test_hand_convert.py covers conversion).
"""

import os

import conftest
import jax
import numpy as np
import pytest

from coarsemetro_jax import build as build_lib
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax import profile
from coarsemetro_jax.convert import adjacency
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.models import fastmetro
from configs import hand_h64
from configs import hand_r50
from configs import tiny

TOLERANCE = 1e-4  # max abs difference, float32
HAND_OUTPUTS = ('pred_cam', 'pred_3d_joints', 'pred_3d_vertices_coarse', 'pred_3d_vertices_fine')
MANO_NPZ = conftest.SMPL_TOPOLOGY_DIR / 'mano_downsampling.npz'
MANO_ADJMAT = conftest.SMPL_TOPOLOGY_DIR / 'mano_195_adjmat'


def tiny_hand_config(network='fastmetro-S'):
  """configs/tiny.py's widths and backbone, turned into a hand network."""
  config = hand_r50.make_hand(tiny.get_config(network.split('-')[0]), network)
  config.model.vertex_tokens = (8, 16, 24)
  return config


def write_hand_hierarchy(path, levels=(778, 195, 49), seed=0):
  """A random plain-layout hierarchy (`save_hierarchy`); returns its arrays.

  Faces are random triangles, down-sampling random selections and the
  up-sampling 3 random neighbours with random weights per vertex: enough
  to check reading, truncation and the up-sampling numbers.
  """
  rng = np.random.default_rng(seed)
  faces = [
      np.stack([rng.choice(n, 3, replace=False) for _ in range(2 * n)]).astype(np.int32)
      for n in levels
  ]
  down = [np.sort(rng.choice(levels[l], levels[l + 1], replace=False)) for l in range(2)]
  up_idx = [
      np.stack([rng.choice(levels[l + 1], 3, replace=False) for _ in range(levels[l])])
      for l in range(2)
  ]
  up_w = [rng.uniform(-0.2, 1.0, (levels[l], 3)) for l in range(2)]
  mesh_topology.save_hierarchy(path, faces, down, up_idx, up_w)
  return faces, down, up_idx, up_w


@pytest.fixture(scope='module')
def hand_hierarchy(tmp_path_factory):
  path = tmp_path_factory.mktemp('hand') / 'hand_downsampling.npz'
  arrays = write_hand_hierarchy(path)
  return str(path), arrays


@pytest.fixture(scope='module')
def hand_topology(hand_hierarchy):
  return mesh_topology.load_hand_topology(hand_hierarchy[0])


@pytest.fixture(scope='module')
def mano_files():
  if not (MANO_NPZ.exists() and MANO_ADJMAT.with_name('mano_195_adjmat_size.pt').exists()):
    pytest.skip(f'real MANO topology files not found in {conftest.SMPL_TOPOLOGY_DIR}')
  return str(MANO_NPZ), str(MANO_ADJMAT)


def _images(size=64, batch=2):
  return np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------------
# Topology.


def test_plain_hand_hierarchy_keeps_levels_778_195(hand_hierarchy, hand_topology):
  _, (faces, down, up_idx, up_w) = hand_hierarchy
  topo = hand_topology
  assert topo.num_vertices == mesh_topology.HAND_LEVELS
  np.testing.assert_array_equal(topo.down_indices[0], down[0])
  # The coarse graph is A[1] (edges of the 195-level faces) plus self-loops.
  f = faces[1]
  expected = np.eye(195, dtype=bool)
  for a, b in ((0, 1), (1, 2), (2, 0)):
    expected[f[:, a], f[:, b]] = expected[f[:, b], f[:, a]] = True
  np.testing.assert_array_equal(topo.coarse_adjacency, expected)
  mask = topo.decoder_attention_mask(21)
  assert mask.shape == (216, 216) and mask[:21].all() and mask[:, :21].all()
  np.testing.assert_array_equal(mask[21:, 21:], expected)
  # The gather equals the dense U[0] built from the written arrays.
  dense = np.zeros((778, 195))
  np.add.at(dense, (np.repeat(np.arange(778), 3), up_idx[0].ravel()), up_w[0].ravel())
  x = np.random.default_rng(2).normal(size=(2, 195, 3))
  np.testing.assert_allclose(
      topo.upsample(x, from_level=1), np.einsum('uv,bvc->buc', dense, x), atol=1e-6
  )


def test_hand_topology_refuses_other_hierarchies(tmp_path):
  with pytest.raises(
      mesh_topology.TopologyError,
      match=r"mesh_downsampling.npz' has mesh levels \(6890, 1723, 431\); a hand hierarchy "
      r'starts with \(778, 195\)',
  ):
    mesh_topology.load_hand_topology(mesh_topology.EMBEDDED_HIERARCHY)
  with pytest.raises(mesh_topology.TopologyError, match='hand mesh hierarchy file not found'):
    mesh_topology.load_hand_topology(str(tmp_path / 'nope.npz'))


def test_networks_refuse_the_other_hierarchy(hand_topology, topology):
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  body_config = tiny.get_config('fastmetro')
  with pytest.raises(ValueError, match=r'levels \(778, 195\).*set config.model.hand'):
    jax.eval_shape(
        models.build_model(body_config.model, hand_topology).init, jax.random.key(0), images
    )
  with pytest.raises(ValueError, match=r'needs a 2-level hand hierarchy'):
    jax.eval_shape(
        models.build_model(tiny_hand_config('coarsemetro').model, topology).init,
        jax.random.key(0),
        images,
    )
  config = tiny_hand_config()
  config.model.upsample_init = 'hierarchy'
  with pytest.raises(ValueError, match='the hand network does not have'):
    jax.eval_shape(models.build_model(config.model, hand_topology).init, jax.random.key(0), images)


# ---------------------------------------------------------------------------
# PyTorch parity (random weights, through a file).


def random_reference(config, topology, seed=2):
  from torch_reference import build
  from torch_reference import random_init

  mask, upsample = build.topology_tensors(topology, config.model.num_joints)
  model = build.reference_model(config.model, mask, upsample)
  return random_init.randomize_(model, seed=seed).eval()


def through_file(torch, model, path):
  torch.save(model.state_dict(), path)
  state, notes = orbax_variables.read_state_dict(path)
  assert not notes
  return state


def _assert_parity(config, topology, reference, state):
  torch = pytest.importorskip('torch')
  variables, report = state_dict_lib.to_flax(
      state,
      tables.model_table(config.model),
      kinds.abstract_variables(config, topology=topology),
  )
  assert not report.ignored
  assert all(k.endswith('num_batches_tracked') for k in report.carried)
  model = models.build_model(config.model, topology)
  images = _images(config.data.image_size)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert sorted(out) == sorted(expected) == sorted(HAND_OUTPUTS)
  shapes = {
      'pred_cam': (2, 3),
      'pred_3d_joints': (2, 21, 3),
      'pred_3d_vertices_coarse': (2, 195, 3),
      'pred_3d_vertices_fine': (2, 778, 3),
  }
  for name in HAND_OUTPUTS:
    got, want = np.asarray(out[name]), expected[name].numpy()
    assert got.shape == want.shape == shapes[name], name
    assert np.abs(want).max() > 0.1, name
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize('size', ['S', 'M', 'L'])
def test_fastmetro_hand_parity(tmp_path, hand_topology, size):
  torch = pytest.importorskip('torch')
  config = tiny_hand_config(f'fastmetro-{size}')
  reference = random_reference(config, hand_topology)
  state = through_file(torch, reference, tmp_path / 'hand.pth')
  assert 'coarse2intermediate_upsample.weight' not in state
  assert state['joint_token_embed.weight'].shape == (21, 32)
  assert state['vertex_token_embed.weight'].shape == (195, 32)
  assert kinds.detect_kind(state, tiny.get_config()) == f'fastmetro-{size}-resnet-hand'
  _assert_parity(config, hand_topology, reference, state)


def test_coarsemetro_hand_parity(tmp_path, hand_topology):
  torch = pytest.importorskip('torch')
  config = tiny_hand_config('coarsemetro')
  reference = random_reference(config, hand_topology)
  state = through_file(torch, reference, tmp_path / 'hand.pth')
  assert state['vertex_upsample.2.weight'].shape == (195, 24)
  assert state['vertex_token_init.weight'].shape == (8, 21)
  _assert_parity(config, hand_topology, reference, state)


# ---------------------------------------------------------------------------
# Configs, build, profile.


@pytest.mark.parametrize(
    'module, arg', [(hand_r50, 'coarsemetro'), (hand_r50, 'fastmetro-S'), (hand_h64, 'fastmetro-L')]
)
def test_hand_recipes_build_hand_outputs(module, arg):
  config = module.get_config(arg)
  assert config.model.hand and config.model.num_joints == 21 and config.num_epochs == 200
  model = models.build_model(config.model, kinds.config_topology(config))
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  assert 'coarse2intermediate_upsample' not in variables['params']
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert {k: v.shape for k, v in out.items()} == {
      'pred_cam': (2, 3),
      'pred_3d_joints': (2, 21, 3),
      'pred_3d_vertices_coarse': (2, 195, 3),
      'pred_3d_vertices_fine': (2, 778, 3),
  }


def test_hand_config_files_load_and_reject_unknown_networks():
  from coarsemetro_jax import config_files

  spec = os.path.join(kinds.REPO_CONFIGS, 'hand_h64.py:fastmetro-L')
  config = config_files.load(spec)
  assert config.to_dict() == hand_h64.get_config('fastmetro-L').to_dict()
  assert config.model.backbone == 'hrnet' and config.model.fastmetro_layers == 3
  with pytest.raises(ValueError, match='hand config argument must be one of coarsemetro'):
    hand_r50.get_config('fastmetro-XL')


def test_build_loads_the_hand_hierarchy(hand_hierarchy):
  config = tiny_hand_config()
  config.topology.hierarchy = hand_hierarchy[0]
  topology, body, model = build_lib.build(config, body=False)
  assert topology.num_vertices == (778, 195) and body is None and model.hand
  # The embedded hand model is not this random hierarchy's mesh.
  with pytest.raises(ValueError, match='is not the mesh of the hand hierarchy'):
    build_lib.build(config)


def test_profile_of_a_hand_network(hand_topology):
  config = tiny_hand_config('fastmetro-M')
  counts = profile.profile_model(models.build_model(config.model, hand_topology), 64)
  # No learned up-sampling layer: the transformer is everything but the backbone.
  assert counts['transformer_params'] == counts['non_backbone_params'] > 0
  assert counts['transformer_gflops'] > 0
  assert profile.model_label(config) == 'FastMETRO-M-resnet-Hand'


# ---------------------------------------------------------------------------
# MANO's real topology files (skipped when absent).


def test_real_mano_mask_has_the_adjacency_shape(mano_files):
  npz, prefix = mano_files
  indices, values, size = adjacency.read_adjmat(prefix)
  topo = mesh_topology.load_hand_topology(npz, (indices, values, size), 'mano_195_adjmat')
  assert size == (195, 195) == topo.coarse_adjacency.shape
  assert topo.num_vertices == (778, 195)
  assert topo.coarse_adjacency.sum() == indices.shape[1] == 1331
  mask = topo.decoder_attention_mask(21)
  assert mask.shape == (216, 216)
  assert mask[21:, 21:].sum() == 1331 and mask[:21].all() and mask[:, :21].all()
  # The hierarchy's own A[1] plus self-loops is the same graph.
  derived = mesh_topology.load_hand_topology(npz)
  np.testing.assert_array_equal(derived.coarse_adjacency, topo.coarse_adjacency)


def test_real_mano_upsampling_equals_dense_u0(mano_files):
  pytest.importorskip('scipy')
  npz, _ = mano_files
  # Independent reader: numpy's unpickler with scipy (trusted local test file).
  u0 = np.load(npz, allow_pickle=True, encoding='latin1')['U'][0].toarray()
  assert u0.shape == (778, 195)
  topo = mesh_topology.load_hand_topology(npz)
  # The gather's weights are float32.
  np.testing.assert_array_equal(topo.upsample_matrix(0), u0.astype(np.float32))
  coarse = np.random.default_rng(3).normal(size=(2, 195, 3)).astype(np.float32)
  fine = jax.jit(lambda c: fastmetro.hand_mesh_outputs(topo, c[:, :1], c[:, :21], c))(coarse)[
      'pred_3d_vertices_fine'
  ]
  np.testing.assert_allclose(fine, np.einsum('uv,bvc->buc', u0, coarse), rtol=0, atol=1e-5)


def test_real_mano_parity_with_fastmetros_own_mask(tmp_path, mano_files):
  """The reference's mask and U come straight from the files, as FastMETRO builds them."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('scipy')
  from torch_reference import fastmetro_hand
  from torch_reference import random_init
  from torch_reference import resnet

  npz, prefix = mano_files
  load = lambda part: torch.load(f'{prefix}_{part}.pt', weights_only=False)
  adjmat = torch.sparse_coo_tensor(load('indices'), load('values'), load('size')).to_dense()
  mask = torch.zeros(216, 216, dtype=torch.bool)
  mask[21:, 21:] = adjmat == 0  # FastMETRO: True = blocked
  u0 = np.load(npz, allow_pickle=True, encoding='latin1')['U'][0].toarray()
  config = tiny_hand_config('fastmetro-S')
  m = config.model
  net = resnet.ResNet(tuple(m.resnet_depths), m.resnet_width)
  reference = fastmetro_hand.FastMETROHand(
      resnet.trunk(net),
      net.out_channels,
      mask,
      torch.tensor(u0, dtype=torch.float32),
      dims=tuple(m.fastmetro_dims),
      ffn_dims=tuple(m.fastmetro_ffn_dims),
      heads=m.num_heads,
  )
  reference = random_init.randomize_(reference, seed=7).eval()
  state = through_file(torch, reference, tmp_path / 'hand.pth')
  config.topology.hierarchy, config.topology.adjmat_prefix = npz, prefix
  topology = build_lib.load_topology(config)
  _assert_parity(config, topology, reference, state)
