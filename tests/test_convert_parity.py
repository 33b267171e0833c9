"""PyTorch -> Flax parity: converted weights give the PyTorch outputs (eval mode).

The PyTorch side is the hand-written reference in torch_reference/ with
random weights and non-trivial BatchNorm statistics; the checkpoint goes
through a real file (torch.save -> torch_file.load). Kept cheap: full-size
ResNet-50 once at 64 x 64, FastMETRO-L / CoarseMETRO with a tiny backbone and
narrow widths on a small synthetic mesh hierarchy.
"""

import jax
import numpy as np
import pytest

from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from configs import r50
from configs import tiny

torch = pytest.importorskip('torch')
from torch_reference import build
from torch_reference import random_init
from torch_reference import resnet

TOLERANCE = 1e-4  # max abs difference, float32
OUTPUTS = (
    'pred_cam',
    'pred_3d_joints',
    'pred_3d_vertices_coarse',
    'pred_3d_vertices_intermediate',
    'pred_3d_vertices_fine',
)


def synthetic_topology(levels=(60, 24, 10), seed=0):
  """A random mesh hierarchy: random 3-sparse up-sampling, random coarse graph."""
  rng = np.random.default_rng(seed)
  adjacency = rng.random((levels[-1], levels[-1])) < 0.3
  adjacency |= adjacency.T | np.eye(levels[-1], dtype=bool)
  k = mesh_topology.UPSAMPLE_NNZ
  up = range(len(levels) - 1)
  return mesh_topology.MeshTopology(
      num_vertices=levels,
      faces=tuple(np.zeros((0, 3), np.int32) for _ in levels),
      edges=tuple(np.zeros((0, 2), np.int32) for _ in levels),
      down_indices=tuple(
          np.sort(rng.choice(levels[l], levels[l + 1], replace=False)).astype(np.int32) for l in up
      ),
      up_indices=tuple(rng.integers(0, levels[l + 1], (levels[l], k)).astype(np.int32) for l in up),
      up_weights=tuple(rng.uniform(-0.2, 1.0, (levels[l], k)).astype(np.float32) for l in up),
      coarse_adjacency=adjacency,
  )


def _through_file(model, tmp_path):
  """torch.save the state dict and read it back without torch."""
  path = tmp_path / 'model.pth'
  torch.save(model.state_dict(), path)
  state, notes = orbax_variables.read_state_dict(path)
  assert not notes
  return state


def _images(size=64, batch=2):
  return np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)


def _torch_forward(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2))


def test_resnet50_imagenet_parity(tmp_path):
  reference = random_init.randomize_(resnet.ResNet(), seed=0).eval()
  state = _through_file(reference, tmp_path)
  config = r50.get_config()
  kind = kinds.detect_kind(state.keys(), config)
  assert kind == 'resnet50-imagenet'
  config, scope = kinds.apply_kind(kind, config)
  variables, report = state_dict_lib.to_flax(
      state, tables.model_table(config.model, scope), kinds.abstract_variables(config, scope)
  )
  assert not report.ignored
  assert [k for k in report.carried if 'num_batches' not in k] == ['fc.weight', 'fc.bias']
  backbone = models.build_backbone(config.model)
  images = _images()
  out = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(
      {c: v['backbone'] for c, v in variables.items()}, images
  )
  expected = _torch_forward(resnet.trunk(reference), images).permute(0, 2, 3, 1).numpy()
  assert out.shape == expected.shape == (2, 2, 2, 2048)
  assert np.abs(expected).max() > 0.5  # non-trivial activations
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=TOLERANCE)


def _parity(config, tmp_path):
  topology = synthetic_topology()
  mask, upsample = build.topology_tensors(topology, config.model.num_joints)
  reference = random_init.randomize_(
      build.reference_model(config.model, mask, upsample), seed=2
  ).eval()
  state = _through_file(reference, tmp_path)
  variables, report = state_dict_lib.to_flax(
      state, tables.model_table(config.model), kinds.abstract_variables(config, topology=topology)
  )
  assert not report.ignored
  assert all(k.endswith('num_batches_tracked') for k in report.carried)
  model = models.build_model(config.model, topology)
  images = _images(config.data.image_size)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  expected = _torch_forward(reference, images)
  for name in OUTPUTS:
    got, want = np.asarray(out[name]), expected[name].numpy()
    assert got.shape == want.shape, name
    assert np.abs(want).max() > 0.1, name
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=name)


def test_fastmetro_l_parity(tmp_path):
  config = tiny.get_config('fastmetro')
  config.model.fastmetro_layers = 3  # FastMETRO-L structure
  _parity(config, tmp_path)


def test_coarsemetro_parity(tmp_path):
  config = tiny.get_config('coarsemetro')
  config.model.vertex_tokens = (4, 6, 8)
  assert config.model.vertex_attention == 'end'
  assert len(set(config.model.stage_dims)) > 1  # exercises dim_reduce_*
  _parity(config, tmp_path)
