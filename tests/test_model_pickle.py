"""The restricted unpickler behind SMPL / MANO pickles and GraphCMR's mesh hierarchies."""

import fractions
import pickle

import numpy as np
import pytest
import scipy.sparse

from coarsemetro_jax import mesh_topology
from coarsemetro_jax import model_pickle


def test_csc_matrix_reads_back_as_its_dense_matrix():
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(7, 5)) * (rng.uniform(size=(7, 5)) < 0.4)
  item = model_pickle.loads(pickle.dumps(scipy.sparse.csc_matrix(dense), protocol=2), 'csc')
  assert isinstance(item, model_pickle.CscStub)
  np.testing.assert_array_equal(item.csc().to_dense(), dense)
  np.testing.assert_array_equal(model_pickle.array(item, 'J', 'f.pkl', ValueError), dense)


def test_any_other_class_is_refused_with_what_was_expected():
  data = pickle.dumps([np.zeros(3), fractions.Fraction(1, 3)], protocol=2)
  with pytest.raises(pickle.UnpicklingError, match='fractions.Fraction: only arrays here'):
    model_pickle.loads(data, 'only arrays here')
  # Plain numpy arrays (and lists of them) come back as they were.
  out = model_pickle.loads(pickle.dumps([np.arange(4.0), np.eye(2)], protocol=2), 'x')
  np.testing.assert_array_equal(out[0], np.arange(4.0))


def _graphcmr_npz(path, mats, extra=None):
  """Writes mats {'A','U','D': csc lists, 'F': arrays} as GraphCMR pickles them."""
  members = {}
  for key in 'AUD':
    members[key] = np.empty(len(mats[key]), object)
    members[key][:] = [scipy.sparse.csc_matrix(m) for m in mats[key]]
  members['F'] = np.empty(len(mats['F']), object)
  members['F'][:] = list(mats['F'])
  members.update(extra or {})
  np.savez(path, **members)


def _embedded_hand_mats():
  mats = mesh_topology._read_matrices(mesh_topology.EMBEDDED_HAND_HIERARCHY)
  return {
      'A': [m.to_dense() for m in mats['A']],
      'U': [m.to_dense() for m in mats['U']],
      'D': [m.to_dense() for m in mats['D']],
      'F': mats['F'],
  }


def test_graphcmr_layout_reads_as_the_plain_layout(tmp_path):
  path = tmp_path / 'mano_downsampling.npz'
  _graphcmr_npz(path, _embedded_hand_mats())
  ours = mesh_topology.load_hand_topology()
  theirs = mesh_topology.load_hand_topology(str(path))
  assert theirs.num_vertices == ours.num_vertices == (778, 195)
  np.testing.assert_array_equal(theirs.upsample_matrix(0), ours.upsample_matrix(0))
  np.testing.assert_array_equal(theirs.down_indices[0], ours.down_indices[0])
  np.testing.assert_array_equal(theirs.coarse_adjacency, ours.coarse_adjacency)
  for a, b in zip(theirs.faces, ours.faces):
    np.testing.assert_array_equal(a, b)


def test_graphcmr_layout_with_a_foreign_object_is_refused(tmp_path):
  mats = _embedded_hand_mats()
  path = tmp_path / 'evil.npz'
  bad = np.empty(len(mats['U']), object)
  bad[:] = [fractions.Fraction(1, 2)] * len(mats['U'])
  _graphcmr_npz(path, mats, extra={'U': bad})
  with pytest.raises(
      mesh_topology.TopologyError,
      match="evil.npz.*key 'U'.*refusing to unpickle fractions.Fraction",
  ):
    mesh_topology.load_hand_topology(str(path))
