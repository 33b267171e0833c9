"""Body model: LBS against a NumPy reference, SMPL pickle loading, the asset."""

import io
import pickle
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coarsemetro_jax import body_model as bm
from coarsemetro_jax import joints as joints_lib
from coarsemetro_jax import mesh_topology

# One jitted forward for all tests (eager op-by-op dispatch is slower).
forward = jax.jit(bm.forward)
BATCH = 8


@pytest.fixture(scope='module')
def body():
  return bm.load_body_model()


def reference_lbs(v_template, shapedirs, posedirs, j_regressor, weights, pose, betas):
  """SMPL's LBS as 4x4 transform chains (float64, one sample)."""
  v_shaped = v_template + shapedirs @ betas  # [V, 3]
  rest = j_regressor @ v_shaped  # [24, 3]
  rot = Rotation.from_rotvec(pose.reshape(-1, 3)).as_matrix()  # [24, 3, 3]
  if posedirs is not None:
    v_shaped = v_shaped + (posedirs.T @ (rot[1:] - np.eye(3)).ravel()).reshape(-1, 3)
  world = []
  for j, p in enumerate(joints_lib.SMPL_PARENTS):
    local = np.eye(4)
    local[:3, :3] = rot[j]
    local[:3, 3] = rest[j] - (rest[p] if p >= 0 else 0)
    world.append(local if p < 0 else world[p] @ local)
  world = np.stack(world)
  joints = world[:, :3, 3].copy()
  world[:, :3, 3] -= np.einsum('jab,jb->ja', world[:, :3, :3], rest)
  per_vertex = np.einsum('vj,jab->vab', weights, world)
  homog = np.concatenate([v_shaped, np.ones((len(v_shaped), 1))], 1)
  return np.einsum('vab,vb->va', per_vertex, homog)[:, :3], joints


def _np(body, key):
  return np.asarray(getattr(body, key), np.float64)


def test_forward_matches_numpy_reference(body):
  rng = np.random.default_rng(0)
  pose = rng.normal(0, 0.5, (BATCH, 72))
  betas = rng.normal(0, 1, (BATCH, 10))
  verts, joints = forward(body, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
  for i in range(0, BATCH, 3):
    ref_v, ref_j = reference_lbs(
        _np(body, 'v_template'),
        _np(body, 'shapedirs'),
        None,
        _np(body, 'j_regressor'),
        _np(body, 'weights'),
        pose[i],
        betas[i],
    )
    np.testing.assert_allclose(verts[i], ref_v, atol=2e-5)
    np.testing.assert_allclose(joints[i], ref_j, atol=2e-5)


def _tiny_body(rng, num_v=40, posedirs=True):
  weights = rng.uniform(size=(num_v, 24)) ** 4
  weights /= weights.sum(1, keepdims=True)
  j_reg = rng.uniform(size=(24, num_v))
  j_reg /= j_reg.sum(1, keepdims=True)
  arrays = {
      'v_template': rng.normal(size=(num_v, 3)),
      'shapedirs': rng.normal(0, 0.1, (num_v, 3, 4)),
      'weights': weights,
      'j_regressor': j_reg,
      'faces': rng.integers(0, num_v, (10, 3)),
      'posedirs': rng.normal(0, 0.1, (num_v, 3, 207)) if posedirs else None,
  }
  return arrays, bm._assemble(arrays, 'tiny', jnp.float32)


def test_forward_with_pose_correctives_matches_reference():
  rng = np.random.default_rng(1)
  arrays, body = _tiny_body(rng)
  pose = rng.normal(0, 0.6, (2, 72))
  betas = rng.normal(0, 1, (2, 3))  # fewer betas than shape directions
  verts, joints = forward(body, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
  posedirs = arrays['posedirs'].reshape(-1, 207).T
  for i in range(2):
    ref_v, ref_j = reference_lbs(
        arrays['v_template'],
        arrays['shapedirs'][..., :3],
        posedirs,
        arrays['j_regressor'],
        arrays['weights'],
        pose[i],
        betas[i],
    )
    np.testing.assert_allclose(verts[i], ref_v, atol=1e-4)
    np.testing.assert_allclose(joints[i], ref_j, atol=1e-4)


def test_identity_pose_returns_shaped_template(body):
  betas = np.random.default_rng(2).normal(size=(BATCH, 10)).astype(np.float32)
  betas[-1] = 0.0
  verts, joints = forward(body, jnp.zeros((BATCH, 72)), jnp.asarray(betas))
  expected = _np(body, 'v_template') + np.einsum('bk,vck->bvc', betas, _np(body, 'shapedirs'))
  np.testing.assert_allclose(verts, expected, atol=1e-5)
  np.testing.assert_allclose(
      joints, np.einsum('jv,bvc->bjc', _np(body, 'j_regressor'), expected), atol=1e-5
  )
  np.testing.assert_allclose(verts[-1], body.v_template, atol=1e-6)


def test_too_many_betas_is_an_error(body):
  with pytest.raises(ValueError, match='11 betas'):
    forward(body, jnp.zeros((1, 72)), jnp.zeros((1, 11)))


def test_jit_cache_hits_across_loads(body):
  forward(body, jnp.zeros((BATCH, 72)), jnp.zeros((BATCH, 10)))
  size = forward._cache_size()
  forward(bm.load_body_model(), jnp.zeros((BATCH, 72)), jnp.zeros((BATCH, 10)))
  assert forward._cache_size() == size


# ----------------------------------------------------------------------------
# SMPL pickle.


def _fake_smpl_pickle(monkeypatch, arrays):
  """Pickle (protocol 2) in SMPL's layout with fake chumpy / scipy classes."""
  chumpy = types.ModuleType('chumpy')
  ch_mod = types.ModuleType('chumpy.ch')

  class Ch:

    def __init__(self, x):
      self.x = x
      self._cache = {'unused': 1}

  Ch.__module__, Ch.__qualname__ = 'chumpy.ch', 'Ch'
  ch_mod.Ch = Ch
  chumpy.ch = ch_mod
  csc_mod = types.ModuleType('scipy.sparse.csc')

  class csc_matrix:  # noqa: N801 (the pickled class name)

    def __init__(self, dense):
      cols = [np.nonzero(c)[0] for c in dense.T]
      self.indices = np.concatenate(cols).astype(np.int32)
      self.indptr = np.cumsum([0] + [len(c) for c in cols]).astype(np.int32)
      self.data = np.concatenate([dense[c, j] for j, c in enumerate(cols)])
      self._shape = dense.shape
      self.format = 'csc'
      self.maxprint = 50

  csc_matrix.__module__, csc_matrix.__qualname__ = 'scipy.sparse.csc', 'csc_matrix'
  csc_mod.csc_matrix = csc_matrix
  for name, mod in (('chumpy', chumpy), ('chumpy.ch', ch_mod), ('scipy.sparse.csc', csc_mod)):
    monkeypatch.setitem(sys.modules, name, mod)
  kintree = np.stack(
      [np.asarray(joints_lib.SMPL_PARENTS, np.int64) % 2**32, np.arange(24)]
  ).astype(np.uint32)
  model = {
      'v_template': Ch(arrays['v_template']),
      'shapedirs': Ch(arrays['shapedirs']),
      'posedirs': arrays['posedirs'],
      'weights': Ch(arrays['weights']),
      'J_regressor': csc_matrix(arrays['j_regressor']),
      'J': Ch(arrays['j_regressor'] @ arrays['v_template']),
      'f': arrays['faces'].astype(np.uint32),
      'kintree_table': kintree,
      'bs_type': 'lrotmin',
      'bs_style': 'lbs',
  }
  return pickle.dumps(model, protocol=2)


def test_smpl_pickle_loads_without_chumpy(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  arrays, reference = _tiny_body(rng)
  arrays['j_regressor'][arrays['j_regressor'] < 0.02] = 0.0  # sparse-ish
  reference = bm._assemble(arrays, 'tiny', jnp.float32)
  path = tmp_path / 'model.pkl'
  with monkeypatch.context() as m:
    path.write_bytes(_fake_smpl_pickle(m, arrays))
  assert b'chumpy.ch' in path.read_bytes() and b'scipy.sparse.csc' in path.read_bytes()
  assert 'chumpy' not in sys.modules
  loaded = bm.load_body_model(str(path))
  for key in (
      'v_template',
      'shapedirs',
      'weights',
      'j_regressor',
      'posedirs',
      'h36m_regressor',
      'j24_regressor',
      'j24_conf',
  ):
    np.testing.assert_allclose(
        getattr(loaded, key), getattr(reference, key), atol=1e-6, err_msg=key
    )
  assert loaded.parents == joints_lib.SMPL_PARENTS
  np.testing.assert_array_equal(np.asarray(loaded.faces), arrays['faces'])
  pose = rng.normal(0, 0.5, (2, 72))
  betas = rng.normal(size=(2, 4))
  verts, _ = forward(loaded, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
  ref_v, _ = reference_lbs(
      arrays['v_template'],
      arrays['shapedirs'],
      arrays['posedirs'].reshape(-1, 207).T,
      arrays['j_regressor'],
      arrays['weights'],
      pose[1],
      betas[1],
  )
  np.testing.assert_allclose(verts[1], ref_v, atol=1e-4)


def test_smpl_pickle_with_h36m_regressor_file(tmp_path, monkeypatch):
  rng = np.random.default_rng(4)
  arrays, _ = _tiny_body(rng, posedirs=False)
  arrays['posedirs'] = np.zeros((40, 3, 207))
  path = tmp_path / 'model.pkl'
  with monkeypatch.context() as m:
    path.write_bytes(_fake_smpl_pickle(m, arrays))
  h36m = rng.uniform(size=(17, 40))
  np.save(tmp_path / 'h36m.npy', h36m)
  loaded = bm.load_body_model(str(path), str(tmp_path / 'h36m.npy'))
  np.testing.assert_allclose(loaded.h36m_regressor, h36m, atol=1e-6)
  j24, conf = map(np.asarray, bm.j24_joints(loaded, jnp.asarray(arrays['v_template'], jnp.float32)))
  j17 = bm.h36m_joints(loaded, jnp.asarray(arrays['v_template'], jnp.float32))
  np.testing.assert_allclose(
      np.asarray(j24)[list(joints_lib.J24_TO_J14)],
      np.asarray(j17)[list(joints_lib.H36M_J17_TO_J14)],
      atol=1e-6,
  )
  assert conf[list(joints_lib.J24_TO_J14)].min() == 1
  np.save(tmp_path / 'bad.npy', h36m[:5])
  with pytest.raises(bm.BodyModelError, match=r'bad.npy.*expected \(17, 40\)'):
    bm.load_body_model(str(path), str(tmp_path / 'bad.npy'))


def test_loader_errors_name_the_file(tmp_path):
  with pytest.raises(bm.BodyModelError, match='not found.*nope.pkl'):
    bm.load_body_model(str(tmp_path / 'nope.pkl'))
  (tmp_path / 'model.obj').write_text('v 0 0 0\n')
  with pytest.raises(bm.BodyModelError, match=r'model.obj.*expected a .npz'):
    bm.load_body_model(str(tmp_path / 'model.obj'))
  np.savez(tmp_path / 'partial.npz', v_template=np.zeros((3, 3)))
  with pytest.raises(bm.BodyModelError, match=r'partial.npz.*missing keys'):
    bm.load_body_model(str(tmp_path / 'partial.npz'))
  evil = b'cos\nsystem\n(S"echo hi"\ntR.'
  (tmp_path / 'evil.pkl').write_bytes(evil)
  with pytest.raises(bm.BodyModelError, match='refusing to unpickle os.system'):
    bm.load_body_model(str(tmp_path / 'evil.pkl'))


# ----------------------------------------------------------------------------
# The committed asset.


def _edges_closed_manifold(faces, num_vertices):
  f = np.asarray(faces, np.int64)
  directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
  undirected, counts = np.unique(np.sort(directed, 1), axis=0, return_counts=True)
  assert (counts == 2).all(), 'every edge must be in exactly 2 faces'
  assert len(np.unique(directed, axis=0)) == len(directed), 'inconsistent orientation'
  assert len(np.unique(f)) == num_vertices
  assert num_vertices - len(undirected) + len(f) == 2  # Euler char: genus 0


def test_embedded_hierarchy_is_closed_manifold_and_nested(body):
  topo = mesh_topology.load_topology()
  assert topo.num_vertices == (6890, 1723, 431)
  assert [len(f) for f in topo.faces] == [13776, 3442, 858]
  for level, faces in enumerate(topo.faces):
    _edges_closed_manifold(faces, topo.num_vertices[level])
  np.testing.assert_array_equal(topo.faces[0], np.asarray(body.faces))
  with zipfile.ZipFile(mesh_topology.EMBEDDED_HIERARCHY) as zf:
    arrays = {n[:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist()}
  for level in range(2):
    # D: one-hot rows (load_topology validates) at sorted, unique kept ids.
    sel = topo.down_indices[level]
    assert (np.diff(sel) > 0).all()
    # U: 3 stored entries per row, non-negative, rows sum to 1.
    assert np.array_equal(
        np.bincount(arrays[f'U{level}_indices'], minlength=topo.num_vertices[level]),
        np.full(topo.num_vertices[level], 3),
    )
    w = topo.up_weights[level]
    assert w.shape[1] == 3 and (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    # Nested: kept vertices up-sample to themselves (U D = I on them), and
    # coarse faces only use kept vertices' positions.
    up = topo.upsample_matrix(level)[sel]
    np.testing.assert_allclose(up, np.eye(len(sel)), atol=1e-6)
  verts = np.asarray(body.v_template)
  coarse = topo.downsample(verts)
  round_trip = topo.upsample(coarse, 2)
  assert np.linalg.norm(round_trip - verts, axis=1).mean() < 0.01  # metres


def test_asset_arrays(body):
  assert body.v_template.shape == (6890, 3) and body.shapedirs.shape == (6890, 3, 10)
  assert body.posedirs is None
  np.testing.assert_allclose(np.asarray(body.weights).sum(1), 1.0, atol=1e-5)
  assert (np.asarray(body.weights) >= 0).all()
  np.testing.assert_allclose(np.asarray(body.j_regressor).sum(1), 1.0, atol=1e-4)
  height = np.ptp(np.asarray(body.v_template)[:, 1])
  assert 1.55 < height < 1.9, height
  # The file holds plain arrays only.
  with np.load(bm.EMBEDDED_BODY, allow_pickle=False) as f:
    assert all(f[k].dtype != object for k in f.files)


def test_regressor_error_under_pose(body):
  rng = np.random.default_rng(5)
  pose = rng.normal(0, 0.3, (BATCH, 72))
  pose[:, :3] = Rotation.random(BATCH, random_state=6).as_rotvec()
  betas = rng.normal(size=(BATCH, 10))
  verts, joints = forward(body, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
  regressed = np.einsum('jv,bvc->bjc', _np(body, 'j_regressor'), np.asarray(verts, np.float64))
  err = np.linalg.norm(regressed - np.asarray(joints), axis=-1)
  assert err.mean() < 2e-3, err.mean()
  assert err.max() < 2e-2, err.max()


def test_h36m_and_j14_joints_are_anatomical(body):
  verts = body.v_template[None]
  j17 = np.asarray(bm.h36m_joints(body, verts))[0]
  conf = np.asarray(bm.j24_joints(body, verts)[1])
  j14 = dict(zip(joints_lib.J14_NAMES, j17[list(joints_lib.H36M_J17_TO_J14)]))
  for name, p in j14.items():  # Y up, facing +Z: the body's left is +X.
    if name.startswith('L_'):
      assert p[0] > 0.05, name
    if name.startswith('R_'):
      assert p[0] < -0.05, name
      np.testing.assert_allclose(p * [-1, 1, 1], j14['L_' + name[2:]], atol=0.02)
  ys = {n: p[1] for n, p in j14.items()}
  assert ys['Head'] > ys['Neck'] > ys['R_Shoulder'] > ys['R_Hip'] > ys['R_Knee'] > ys['R_Ankle']
  nose = j17[joints_lib.H36M_J17_NAMES.index('Nose')]
  assert nose[2] > j14['Neck'][2] + 0.05  # the nose points forward
  # Evaluation rows follow the documented construction and J24 agrees with J14.
  h36m = bm.h36m_equivalent(body.j_regressor, body.v_template, body.weights)
  np.testing.assert_allclose(body.h36m_regressor, h36m, atol=1e-6)
  j24 = np.asarray(bm.j24_joints(body, verts)[0])
  np.testing.assert_allclose(
      j24[0, list(joints_lib.J24_TO_J14)], j17[list(joints_lib.H36M_J17_TO_J14)], atol=1e-6
  )
  assert conf[list(joints_lib.J24_TO_J14)].min() == 1
  assert conf[joints_lib.J24_NAMES.index('Jaw')] == 0


def _coo(dense):
  rows, cols = np.nonzero(dense)
  return np.stack([rows, cols]), dense[rows, cols], dense.shape


def test_adjmat_arrays_replace_the_derived_adjacency():
  derived = mesh_topology.load_topology().coarse_adjacency  # bool [431, 431]
  assert derived.shape == (431, 431) and derived.diagonal().all()
  # Drop one edge (both directions) and row-normalise, as FastMETRO's values are.
  i, j = np.argwhere(np.triu(derived, 1))[0]
  edited = derived.copy()
  edited[i, j] = edited[j, i] = False
  weights = edited / edited.sum(1, keepdims=True)
  indices, values, size = _coo(weights)
  zero_entry = (np.array([[i], [j]]), np.zeros(1), size)  # explicit zero: no edge
  scipy_sparse = pytest.importorskip('scipy.sparse')
  for adjmat in (
      (indices, values, size),
      weights,
      scipy_sparse.csr_matrix(weights),
      (np.concatenate([indices, zero_entry[0]], 1), np.concatenate([values, zero_entry[1]]), size),
  ):
    topology = mesh_topology.load_topology(adjmat=adjmat)
    np.testing.assert_array_equal(topology.coarse_adjacency, edited)
    assert not topology.decoder_attention_mask(14)[14 + i, 14 + j]


@pytest.mark.parametrize(
    'adjmat, message',
    [
        ((np.zeros((2, 0), np.int64), np.zeros(0), (430, 430)), r'size \(430, 430\)'),
        ((np.array([[0], [431]]), np.ones(1), (431, 431)), r'indices \(2, 1\)'),
        ((np.zeros((3, 4), np.int64), np.ones(4), (431, 431)), r'indices \(3, 4\)'),
        (np.eye(430), r'shape \(430, 430\)'),
    ],
)
def test_adjmat_that_does_not_fit_is_refused(adjmat, message):
  with pytest.raises(mesh_topology.TopologyError, match=r'^adj_\*\.pt: .*' + message):
    mesh_topology.load_topology(adjmat=adjmat, adjmat_source='adj_*.pt')


def test_forward_rotmats_matches_axis_angle_path_and_reference():
  rng = np.random.default_rng(7)
  arrays, body = _tiny_body(rng)
  pose = rng.normal(0, 0.6, (3, 72))
  betas = rng.normal(0, 1, (3, 4))
  # Rotation matrices from SciPy, not from bm.rodrigues.
  rotmats = Rotation.from_rotvec(pose.reshape(-1, 3)).as_matrix().reshape(3, 24, 3, 3)
  verts, joints = jax.jit(bm.forward_rotmats)(
      body, jnp.asarray(rotmats, jnp.float32), jnp.asarray(betas, jnp.float32)
  )
  ref_verts, ref_joints = forward(
      body, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32)
  )
  np.testing.assert_allclose(verts, ref_verts, atol=1e-5)
  np.testing.assert_allclose(joints, ref_joints, atol=1e-5)
  posedirs = arrays['posedirs'].reshape(-1, 207).T
  for i in range(3):
    np_verts, np_joints = reference_lbs(
        arrays['v_template'],
        arrays['shapedirs'],
        posedirs,
        arrays['j_regressor'],
        arrays['weights'],
        pose[i],
        betas[i],
    )
    np.testing.assert_allclose(verts[i], np_verts, atol=1e-4)
    np.testing.assert_allclose(joints[i], np_joints, atol=1e-4)
