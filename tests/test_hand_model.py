"""Hand model: MANO LBS against a NumPy reference, 21 joints, MANO pickles, left hands."""

import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from scipy.spatial.transform import Rotation

from coarsemetro_jax import hand_model as hm

# One jitted forward for all tests (eager op-by-op dispatch is slower).
forward = jax.jit(hm.forward)
BATCH = 6
# MANO's kinematic tree and the 21-joint order, written out independently.
PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
FINGER_JOINTS = {'thumb': (13, 14, 15), 'index': (1, 2, 3), 'middle': (4, 5, 6)}
FINGER_JOINTS.update(ring=(10, 11, 12), pinky=(7, 8, 9))
MIRROR = np.asarray([-1.0, 1.0, 1.0])


@pytest.fixture(scope='module')
def hand():
  return hm.load_hand_model()


@pytest.fixture(scope='module')
def arrays():
  with np.load(hm.EMBEDDED_HAND, allow_pickle=False) as f:
    return {k: f[k].astype(np.float64) if f[k].dtype == np.float32 else f[k] for k in f.files}


def reference_mano(arrays, tips, pose, betas):
  """MANO's LBS as 4x4 transform chains (float64, one sample, MANO's layouts).

  Returns vertices [V, 3] and the 21 hand joints [21, 3].
  """
  v_shaped = arrays['v_template'] + arrays['shapedirs'][..., : len(betas)] @ betas
  rest = arrays['J_regressor'] @ v_shaped  # [16, 3]
  rot = Rotation.from_rotvec(pose.reshape(16, 3)).as_matrix()
  v_posed = v_shaped + arrays['posedirs'] @ (rot[1:] - np.eye(3)).ravel()  # [V, 3]
  world = []
  for j, p in enumerate(PARENTS):
    local = np.eye(4)
    local[:3, :3] = rot[j]
    local[:3, 3] = rest[j] - (rest[p] if p >= 0 else 0)
    world.append(local if p < 0 else world[p] @ local)
  world = np.stack(world)
  joints = world[:, :3, 3].copy()
  world[:, :3, 3] -= np.einsum('jab,jb->ja', world[:, :3, :3], rest)
  per_vertex = np.einsum('vj,jab->vab', arrays['weights'], world)
  homog = np.concatenate([v_posed, np.ones((len(v_posed), 1))], 1)
  verts = np.einsum('vab,vb->va', per_vertex, homog)[:, :3]
  hand21 = [joints[0]]
  for finger, tip in zip(('thumb', 'index', 'middle', 'ring', 'pinky'), tips):
    hand21 += [joints[j] for j in FINGER_JOINTS[finger]] + [verts[tip]]
  return verts, np.stack(hand21)


def _random_pose(rng, batch):
  pose = rng.normal(0, 0.4, (batch, 16, 3))
  pose[:, 0] = Rotation.random(batch, random_state=int(rng.integers(1000))).as_rotvec()
  pose[:, 1:13, 2] += rng.uniform(0, 1.5, (batch, 12))  # finger flexion (MANO's frame)
  return pose.reshape(batch, 48)


def _run(model, pose, betas):
  v, j = forward(model, jnp.asarray(pose, jnp.float32), jnp.asarray(betas, jnp.float32))
  return np.asarray(v, np.float64), np.asarray(j, np.float64)


def test_hand_joint_order():
  assert hm.HAND_JOINT_NAMES[:6] == ('wrist', 'thumb1', 'thumb2', 'thumb3', 'thumb4', 'index1')
  assert hm.HAND_JOINT_NAMES[-1] == 'pinky4' and hm.NUM_HAND_JOINTS == 21
  # [16 MANO joints; tips thumb 16, index 17, middle 18, ring 19, pinky 20].
  assert hm.HAND_FROM_MANO == (
      0,
      13,
      14,
      15,
      16,
      1,
      2,
      3,
      17,
      4,
      5,
      6,
      18,
      10,
      11,
      12,
      19,
      7,
      8,
      9,
      20,
  )
  assert hm.MANO_PARENTS == PARENTS


def test_zero_pose_and_betas_give_the_template(hand, arrays):
  verts, joints = _run(hand, np.zeros((2, 48)), np.zeros((2, 10)))
  np.testing.assert_allclose(verts, np.broadcast_to(arrays['v_template'], verts.shape), atol=1e-6)
  _, ref_joints = reference_mano(arrays, hand.tip_vertex_ids, np.zeros(48), np.zeros(10))
  np.testing.assert_allclose(joints[1], ref_joints, atol=1e-6)


def test_forward_matches_numpy_reference(hand, arrays):
  rng = np.random.default_rng(0)
  pose, betas = _random_pose(rng, BATCH), rng.normal(0, 1, (BATCH, 10))
  verts, joints = _run(hand, pose, betas)
  assert verts.shape == (BATCH, 778, 3) and joints.shape == (BATCH, 21, 3)
  for i in range(BATCH):
    ref_v, ref_j = reference_mano(arrays, hand.tip_vertex_ids, pose[i], betas[i])
    np.testing.assert_allclose(verts[i], ref_v, atol=2e-6)
    np.testing.assert_allclose(joints[i], ref_j, atol=2e-6)
  # Fewer betas than shape directions use the leading ones.
  v4, _ = _run(hand, pose[:1], betas[:1, :4])
  ref_v, _ = reference_mano(arrays, hand.tip_vertex_ids, pose[0], betas[0, :4])
  np.testing.assert_allclose(v4[0], ref_v, atol=2e-6)


def test_regressed_joints_follow_the_pose(hand):
  rng = np.random.default_rng(1)
  verts, joints = _run(hand, _random_pose(rng, 32), rng.normal(0, 1, (32, 10)))
  regressed = np.einsum('jv,bvc->bjc', np.asarray(hand.j_regressor, np.float64), verts)
  err = np.linalg.norm(
      regressed - joints[:, [hm.HAND_FROM_MANO.index(j) for j in range(16)]], axis=-1
  )
  assert err.mean() < 5e-4 and err.max() < 2e-3, (err.mean(), err.max())  # metres


def test_bad_pose_shape_is_an_error(hand):
  with pytest.raises(ValueError, match=r'expected \[B, 48\]'):
    hm.forward(hand, jnp.zeros((2, 72)), jnp.zeros((2, 10)))


def test_pose_from_pca(hand):
  rng = np.random.default_rng(2)
  orient, coeffs = rng.normal(size=(3, 3)), rng.normal(size=(3, 6))
  # The embedded hand's PCA is the identity with a zero mean.
  pose = np.asarray(hm.pose_from_pca(hand, orient, coeffs))
  np.testing.assert_allclose(
      pose, np.concatenate([orient, coeffs, np.zeros((3, 39))], 1), atol=1e-6
  )
  comps, mean = rng.normal(size=(45, 45)), rng.normal(size=45)
  other = hand.replace(hands_components=jnp.asarray(comps), hands_mean=jnp.asarray(mean))
  for flat in (False, True):
    expected = coeffs @ comps[:6] + (0 if flat else mean)
    pose = np.asarray(hm.pose_from_pca(other, orient, coeffs, flat_hand_mean=flat))
    np.testing.assert_allclose(pose[:, 3:], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# MANO's pickle, written here with numpy / scipy objects and a fake chumpy.


def _mano_pickle(monkeypatch, arrays, posedirs):
  """Pickle (protocol 2) in MANO_RIGHT.pkl's layout: chumpy shapedirs, a scipy
  csc_matrix J_regressor, numpy arrays for the rest."""
  chumpy = types.ModuleType('chumpy')
  ch_mod = types.ModuleType('chumpy.ch')

  class Ch:

    def __init__(self, x):
      self.x = x
      self._cache = {'unused': 1}

  Ch.__module__, Ch.__qualname__ = 'chumpy.ch', 'Ch'
  ch_mod.Ch = Ch
  chumpy.ch = ch_mod
  monkeypatch.setitem(sys.modules, 'chumpy', chumpy)
  monkeypatch.setitem(sys.modules, 'chumpy.ch', ch_mod)
  kintree = np.stack([np.asarray(PARENTS) % 2**32, np.arange(16)]).astype(np.int64)
  model = {
      'v_template': arrays['v_template'],
      'shapedirs': Ch(arrays['shapedirs']),
      'posedirs': posedirs,
      'weights': arrays['weights'],
      'J_regressor': scipy.sparse.csc_matrix(arrays['J_regressor']),
      'J': arrays['J_regressor'] @ arrays['v_template'],
      'f': arrays['f'].astype(np.uint32),
      'kintree_table': kintree,
      'hands_components': arrays['hands_components'],
      'hands_mean': arrays['hands_mean'],
      'hands_coeffs': np.zeros((1554, 45)),
      'bs_type': 'lrotmin',
      'bs_style': 'lbs',
  }
  return pickle.dumps(model, protocol=2)


def test_mano_pickle_loads_without_chumpy_and_matches_the_npz(tmp_path, monkeypatch, hand, arrays):
  path = tmp_path / 'MANO_RIGHT.pkl'
  with monkeypatch.context() as m:
    path.write_bytes(_mano_pickle(m, arrays, arrays['posedirs']))
  data = path.read_bytes()
  assert b'chumpy.ch' in data and b'scipy.sparse' in data and 'chumpy' not in sys.modules
  # MANO's own files list no fingertips: MANO's vertex ids by default.
  assert hm.load_hand_model(str(path)).tip_vertex_ids == hm.MANO_TIP_VERTICES
  loaded = hm.load_hand_model(str(path), tip_vertex_ids=hand.tip_vertex_ids)
  for key in (
      'v_template',
      'shapedirs',
      'weights',
      'j_regressor',
      'hands_components',
      'hands_mean',
  ):
    np.testing.assert_array_equal(getattr(loaded, key), getattr(hand, key), err_msg=key)
  assert loaded.posedirs is None and loaded.parents == PARENTS
  np.testing.assert_array_equal(np.asarray(loaded.faces), np.asarray(hand.faces))
  rng = np.random.default_rng(3)
  pose, betas = _random_pose(rng, 2), rng.normal(size=(2, 10))
  for a, b in zip(_run(loaded, pose, betas), _run(hand, pose, betas)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def corrective_hand(tmp_path, monkeypatch, arrays):
  """A MANO pickle with random pose correctives; (model, its arrays)."""
  rng = np.random.default_rng(4)
  arrays = dict(arrays, posedirs=rng.normal(0, 2e-3, (778, 3, 135)))
  path = tmp_path / 'model.pkl'
  with monkeypatch.context() as m:
    path.write_bytes(_mano_pickle(m, arrays, arrays['posedirs']))
  return hm.load_hand_model(str(path), tip_vertex_ids=(1, 2, 3, 4, 5)), arrays


def test_mano_pickle_with_pose_correctives_matches_reference(corrective_hand):
  model, arrays = corrective_hand
  assert model.posedirs.shape == (135, 778 * 3)
  rng = np.random.default_rng(5)
  pose, betas = _random_pose(rng, 2), rng.normal(size=(2, 10))
  verts, joints = _run(model, pose, betas)
  for i in range(2):
    ref_v, ref_j = reference_mano(arrays, (1, 2, 3, 4, 5), pose[i], betas[i])
    np.testing.assert_allclose(verts[i], ref_v, atol=2e-6)
    np.testing.assert_allclose(joints[i], ref_j, atol=2e-6)


def test_disallowed_class_is_refused_in_one_line(tmp_path):
  (tmp_path / 'evil.pkl').write_bytes(b'cos\nsystem\n(S"echo hi"\ntR.')
  with pytest.raises(hm.HandModelError, match='evil.pkl.*refusing to unpickle os.system') as e:
    hm.load_hand_model(str(tmp_path / 'evil.pkl'))
  assert '\n' not in str(e.value)
  # A disallowed object inside an otherwise MANO-like dict.
  import fractions

  model = {'v_template': np.zeros((3, 3)), 'hands_mean': fractions.Fraction(1, 3)}
  (tmp_path / 'odd.pkl').write_bytes(pickle.dumps(model, protocol=2))
  with pytest.raises(hm.HandModelError, match='refusing to unpickle fractions.Fraction'):
    hm.load_hand_model(str(tmp_path / 'odd.pkl'))


def test_loader_errors_name_the_file(tmp_path, arrays):
  with pytest.raises(hm.HandModelError, match='not found.*MANO_RIGHT.pkl'):
    hm.load_hand_model(str(tmp_path / 'MANO_RIGHT.pkl'))
  (tmp_path / 'hand.obj').write_text('v 0 0 0\n')
  with pytest.raises(hm.HandModelError, match=r'hand.obj.*expected a .npz'):
    hm.load_hand_model(str(tmp_path / 'hand.obj'))
  np.savez(tmp_path / 'partial.npz', v_template=np.zeros((3, 3)))
  with pytest.raises(hm.HandModelError, match=r"partial.npz.*missing keys \['shapedirs'"):
    hm.load_hand_model(str(tmp_path / 'partial.npz'))
  kintree = arrays['kintree_table'].copy()
  kintree[0, 4] = 3  # middle1 hung from index3
  np.savez(tmp_path / 'tree.npz', **dict(arrays, kintree_table=kintree))
  with pytest.raises(hm.HandModelError, match="tree.npz.*not MANO's"):
    hm.load_hand_model(str(tmp_path / 'tree.npz'))
  np.savez(tmp_path / 'order.npz', **dict(arrays, kintree_table=kintree[:, ::-1].copy()))
  with pytest.raises(hm.HandModelError, match="order.npz': kintree_table is not a tree"):
    hm.load_hand_model(str(tmp_path / 'order.npz'))
  np.savez(tmp_path / 'weights.npz', **dict(arrays, weights=arrays['weights'][:, :15]))
  with pytest.raises(hm.HandModelError, match=r"weights.npz': weights has shape \(778, 15\)"):
    hm.load_hand_model(str(tmp_path / 'weights.npz'))
  with pytest.raises(hm.HandModelError, match='fingertip vertices'):
    hm.load_hand_model('', tip_vertex_ids=(1, 2, 3, 4, 778))


# ----------------------------------------------------------------------------
# Left hands.


def _signed_volume(verts, faces):
  tri = np.asarray(verts, np.float64)[np.asarray(faces)]
  return np.einsum('fi,fi->f', tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6


def test_mirror_is_the_left_hand(hand, corrective_hand):
  left = hm.mirror(hand)
  assert left.side == 'left' and hm.mirror(left).side == 'right'
  np.testing.assert_array_equal(np.asarray(left.faces), np.asarray(hand.faces)[:, [2, 1, 0]])
  # Outward normals on both sides: flipping x alone would turn them inwards.
  assert _signed_volume(left.v_template, left.faces) > 0
  assert _signed_volume(hand.v_template, left.faces) < 0
  rng = np.random.default_rng(6)
  pose, betas = _random_pose(rng, 3), rng.normal(size=(3, 10))
  for model in (hand, corrective_hand[0]):  # the second has pose correctives
    right_v, right_j = _run(model, pose, betas)
    left_v, left_j = _run(hm.mirror(model), np.asarray(hm.mirror_pose(pose)), betas)
    np.testing.assert_allclose(left_v, right_v * MIRROR, atol=1e-6)
    np.testing.assert_allclose(left_j, right_j * MIRROR, atol=1e-6)
  # A mirrored rotation matrix is M R M.
  rot = Rotation.from_rotvec(pose[0].reshape(16, 3)).as_matrix()
  rot_left = Rotation.from_rotvec(np.asarray(hm.mirror_pose(pose[0])).reshape(16, 3)).as_matrix()
  np.testing.assert_allclose(rot_left, np.diag(MIRROR) @ rot @ np.diag(MIRROR), atol=1e-12)
  twice = hm.mirror(hm.mirror(corrective_hand[0]))
  for key in ('v_template', 'shapedirs', 'posedirs', 'hands_components', 'hands_mean'):
    np.testing.assert_array_equal(getattr(twice, key), getattr(corrective_hand[0], key))
