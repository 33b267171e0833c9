"""build.build: topology (with FastMETRO's adjacency files), body model and model of a config."""

import numpy as np
import pytest

from coarsemetro_jax import build
from coarsemetro_jax import mesh_topology
from coarsemetro_jax.convert import torch_writer
from configs import tiny


def _write_adjmat(prefix, dense):
  rows, cols = np.nonzero(dense)
  torch_writer.save(np.stack([rows, cols]).astype(np.int64), f'{prefix}_indices.pt')
  torch_writer.save(dense[rows, cols].astype(np.float32), f'{prefix}_values.pt')
  torch_writer.save(tuple(dense.shape), f'{prefix}_size.pt')


def test_builds_topology_body_and_model():
  config = tiny.get_config('fastmetro')
  topology, body, model = build.build(config)
  assert topology.num_vertices == mesh_topology.SMPL_LEVELS
  assert body.v_template.shape == (6890, 3)
  assert model.topology is topology and type(model).__name__ == 'FastMETRO'
  assert build.build(config, body=False).body is None


def test_adjmat_prefix_files_set_the_decoder_adjacency(tmp_path):
  derived = mesh_topology.load_topology().coarse_adjacency
  i, j = np.argwhere(np.triu(derived, 1))[0]
  edited = derived.copy()
  edited[i, j] = edited[j, i] = False
  _write_adjmat(tmp_path / 'adj', edited / edited.sum(1, keepdims=True))
  config = tiny.get_config('coarsemetro')
  config.topology.adjmat_prefix = str(tmp_path / 'adj')
  topology, _, model = build.build(config, body=False)
  np.testing.assert_array_equal(topology.coarse_adjacency, edited)
  assert model.topology is topology


def test_adjmat_prefix_errors_name_the_files(tmp_path):
  config = tiny.get_config('coarsemetro')
  config.topology.adjmat_prefix = str(tmp_path / 'adj')
  with pytest.raises(mesh_topology.TopologyError, match='adj_indices.pt'):
    build.build(config, body=False)
  _write_adjmat(tmp_path / 'adj', np.eye(5))
  with pytest.raises(
      mesh_topology.TopologyError,
      match=r'adj_\*\.pt: adjacency of size \(5, 5\) .* \(431 vertices\)',
  ):
    build.build(config, body=False)
