"""SMPL-style body model in JAX: linear blend skinning and evaluation joints.

Loads either

* the embedded body (`path=''`): `assets/body_model.npz`, derived from CC0
  MakeHuman data by `tools/build_body_assets.py` (6890 vertices, 10 shape
  directions, 24-joint SMPL tree, no pose correctives; see assets/NOTICE);
* the project's `.npz` layout (same keys as the embedded file);
* a real SMPL model `.pkl` (e.g. `basicModel_neutral_lbs_10_207_0_v1.0.0.pkl`),
  a Python 2 pickle of chumpy arrays and a scipy sparse J_regressor. It is
  read by a restricted unpickler that maps those classes to inert stand-ins
  and rebuilds nothing else, so neither chumpy nor old scipy is needed.
  With SMPL, pass `h36m_regressor=.../J_regressor_h36m_correct.npy` for the
  Human3.6M evaluation joints of METRO/FastMETRO.

`forward` returns vertices and joints without translation, as FastMETRO's
SMPL layer does.
"""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import joints as joints_lib
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import model_pickle

EMBEDDED_BODY = os.path.join(mesh_topology.ASSETS_DIR, 'body_model.npz')
NUM_JOINTS = joints_lib.NUM_SMPL_JOINTS
_HIGHEST = jax.lax.Precision.HIGHEST
_HEAD = joints_lib.SMPL_JOINT_NAMES.index('head')
_NPZ_KEYS = ('v_template', 'shapedirs', 'weights', 'j_regressor', 'faces')


class BodyModelError(ValueError):
  """A body-model file is missing, malformed or inconsistent."""


class StaticArray:
  """Read-only NumPy array usable as a static pytree field.

  Hashable and compared by content (jit caches key on static fields); use
  `np.asarray(x)` or `x.array` to get the array.
  """

  def __init__(self, array):
    self.array = np.array(array)
    self.array.setflags(write=False)
    self._hash = hash((self.array.shape, self.array.dtype.str, self.array.tobytes()))

  def __array__(self, dtype=None, copy=None):
    del copy
    return self.array if dtype is None else self.array.astype(dtype)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (
        isinstance(other, StaticArray)
        and self._hash == other._hash
        and np.array_equal(self.array, other.array)
    )

  def __len__(self):
    return len(self.array)

  def __getitem__(self, index):
    return self.array[index]

  @property
  def shape(self):
    return self.array.shape

  @property
  def dtype(self):
    return self.array.dtype

  def __repr__(self):
    return f'StaticArray(shape={self.shape}, dtype={self.dtype})'


@flax.struct.dataclass
class BodyModel:
  """Arrays of an SMPL-style body (a pytree; faces and parents are static)."""

  v_template: jax.Array  # [V, 3]
  shapedirs: jax.Array  # [V, 3, K]
  j_regressor: jax.Array  # [24, V] dense
  weights: jax.Array  # [V, 24]
  h36m_regressor: jax.Array  # [17, V]
  j24_regressor: jax.Array  # [24, V]: METRO's J24 joints from vertices
  j24_conf: jax.Array  # [24]: 1 where j24_regressor defines the joint
  faces: StaticArray = flax.struct.field(pytree_node=False)  # int [F, 3]
  parents: tuple[int, ...] = flax.struct.field(pytree_node=False)
  posedirs: jax.Array | None = None  # [P, V * 3] pose correctives (SMPL: 207)
  source: str = flax.struct.field(pytree_node=False, default='')

  @property
  def num_vertices(self):
    return self.v_template.shape[0]

  @property
  def num_betas(self):
    return self.shapedirs.shape[-1]


# ----------------------------------------------------------------------------
# Skinning.


def rodrigues(rotvec):
  """Axis-angle [..., 3] -> rotation matrices [..., 3, 3] (finite at 0)."""
  theta = jnp.sqrt(jnp.sum(rotvec * rotvec, -1, keepdims=True) + 1e-16)
  axis = rotvec / theta
  x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
  zero = jnp.zeros_like(x)
  cross = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1)
  cross = cross.reshape(rotvec.shape[:-1] + (3, 3))
  sin, cos = jnp.sin(theta)[..., None], jnp.cos(theta)[..., None]
  return (
      jnp.eye(3, dtype=rotvec.dtype)
      + sin * cross
      + (1 - cos) * jnp.matmul(cross, cross, precision=_HIGHEST)
  )


def shaped_vertices(body, betas):
  """Rest-pose vertices of shapes [B, K'] (K' <= K) -> [B, V, 3]."""
  k = betas.shape[-1]
  if k > body.num_betas:
    raise ValueError(
        f'{k} betas given; the body model has {body.num_betas} ' f'shape directions ({body.source})'
    )
  return body.v_template + jnp.einsum(
      'bk,vck->bvc', betas, body.shapedirs[..., :k], precision=_HIGHEST
  )


def forward_kinematics(rest_joints, rotmats, parents):
  """Posed joints [B, J, 3] and global rotations [B, J, 3, 3].

  rest_joints [B, J, 3]; rotmats [B, J, 3, 3] local rotations (joint 0 is the
  global orientation about the root's rest location).
  """
  rots = [rotmats[:, 0]]
  pos = [rest_joints[:, 0]]
  for j in range(1, len(parents)):
    p = parents[j]
    rots.append(jnp.matmul(rots[p], rotmats[:, j], precision=_HIGHEST))
    bone = rest_joints[:, j] - rest_joints[:, p]
    pos.append(pos[p] + jnp.einsum('bij,bj->bi', rots[p], bone, precision=_HIGHEST))
  return jnp.stack(pos, 1), jnp.stack(rots, 1)


def forward(body, pose, betas):
  """SMPL linear blend skinning without translation.

  Args:
    body: BodyModel (or hand_model.HandModel: the same fields, 16 joints).
    pose: [B, 72] (or [B, 24, 3]) axis-angle; joint 0 is the global orientation.
    betas: [B, K'] shape coefficients, K' <= body.num_betas.

  Returns:
    vertices [B, V, 3] and joints [B, 24, 3].
  """
  pose = jnp.asarray(pose, body.v_template.dtype)
  return forward_rotmats(body, rodrigues(pose.reshape(pose.shape[0], -1, 3)), betas)


def forward_rotmats(body, rotmats, betas):
  """`forward` with the pose as local rotation matrices [B, 24, 3, 3]."""
  b = rotmats.shape[0]
  dtype = body.v_template.dtype
  rotmats = jnp.asarray(rotmats, dtype)  # [B, 24, 3, 3]
  v_shaped = shaped_vertices(body, jnp.asarray(betas, dtype))  # [B, V, 3]
  rest = jnp.einsum('jv,bvc->bjc', body.j_regressor, v_shaped, precision=_HIGHEST)  # [B, 24, 3]
  if body.posedirs is not None:
    feature = (rotmats[:, 1:] - jnp.eye(3, dtype=dtype)).reshape(b, -1)  # [B, 207]
    v_shaped = v_shaped + jnp.matmul(feature, body.posedirs, precision=_HIGHEST).reshape(
        v_shaped.shape
    )
  joints, rots = forward_kinematics(rest, rotmats, body.parents)
  trans = joints - jnp.einsum('bjik,bjk->bji', rots, rest, precision=_HIGHEST)
  affine = jnp.concatenate([rots, trans[..., None]], -1).reshape(b, -1, 12)
  blend = jnp.einsum('vj,bjk->bvk', body.weights, affine, precision=_HIGHEST).reshape(
      b, -1, 3, 4
  )  # [B, V, 3, 4]
  vertices = (
      jnp.einsum('bvik,bvk->bvi', blend[..., :3], v_shaped, precision=_HIGHEST) + blend[..., 3]
  )
  return vertices, joints


def h36m_joints(body, vertices):
  """Human3.6M-17 joints [..., 17, 3] from vertices [..., V, 3]."""
  return jnp.einsum('jv,...vc->...jc', body.h36m_regressor, vertices, precision=_HIGHEST)


def j24_joints(body, vertices):
  """METRO's J24 joints [..., 24, 3] and their availability [24] (1/0)."""
  j24 = jnp.einsum('jv,...vc->...jc', body.j24_regressor, vertices, precision=_HIGHEST)
  return j24, body.j24_conf


# ----------------------------------------------------------------------------
# Evaluation regressors (NumPy; also built this way by tools/build_body_assets).


def landmark_vertices(v_template, weights):
  """(nose tip, head top) vertex ids: the most forward (+Z) and the highest
  (+Y) of the vertices skinned mostly to the head (weight > 0.9 of the max)."""
  head_w = np.asarray(weights)[:, _HEAD]
  head = np.nonzero(head_w > 0.9 * head_w.max())[0]
  v = np.asarray(v_template)
  return int(head[np.argmax(v[head, 2])]), int(head[np.argmax(v[head, 1])])


def h36m_equivalent(j_regressor, v_template, weights):
  """[17, V] H36M regressor from SMPL joint rows plus nose/head-top vertices."""
  j_regressor = np.asarray(j_regressor, np.float64)
  nose, top = landmark_vertices(v_template, weights)
  eye = np.eye(j_regressor.shape[1])
  smpl = dict(zip(joints_lib.SMPL_JOINT_NAMES, j_regressor))
  rows = {
      'Pelvis': smpl['pelvis'],
      'R_Hip': smpl['right_hip'],
      'R_Knee': smpl['right_knee'],
      'R_Ankle': smpl['right_ankle'],
      'L_Hip': smpl['left_hip'],
      'L_Knee': smpl['left_knee'],
      'L_Ankle': smpl['left_ankle'],
      'Torso': smpl['spine2'],
      'Neck': smpl['neck'],
      'Nose': eye[nose],
      'Head': eye[top],
      'L_Shoulder': smpl['left_shoulder'],
      'L_Elbow': smpl['left_elbow'],
      'L_Wrist': smpl['left_wrist'],
      'R_Shoulder': smpl['right_shoulder'],
      'R_Elbow': smpl['right_elbow'],
      'R_Wrist': smpl['right_wrist'],
  }
  return np.stack([rows[n] for n in joints_lib.H36M_J17_NAMES])


def j24_from_h36m(h36m, j_regressor, v_template):
  """[24, V] J24 regressor and availability [24] from H36M-17 rows.

  The J24 joints that J14 uses (LSP limbs, Neck, Head) are the H36M rows that
  `H36M_J17_TO_J14` picks, so GT and predicted J14 agree; Top_of_Head = H36M
  Head, Pelvis = H36M Pelvis, Spine = H36M Torso, Thorax = SMPL spine3, Nose =
  H36M Nose. Jaw, eyes and ears are unavailable (conf 0).
  """
  h36m = np.asarray(h36m, np.float64)
  rows = dict(zip(joints_lib.H36M_J17_NAMES, h36m))
  rows.update(
      Top_of_Head=rows['Head'],
      Spine=rows['Torso'],
      Thorax=np.asarray(j_regressor, np.float64)[joints_lib.SMPL_JOINT_NAMES.index('spine3')],
  )
  j24 = np.zeros((len(joints_lib.J24_NAMES), len(v_template)))
  conf = np.zeros(len(joints_lib.J24_NAMES))
  for i, name in enumerate(joints_lib.J24_NAMES):
    if name in rows:
      j24[i], conf[i] = rows[name], 1.0
  return j24, conf


# ----------------------------------------------------------------------------
# Loading.


def load_body_model(path='', h36m_regressor='', dtype=jnp.float32):
  """Loads a body model: '' = embedded, '.npz' = project format, '.pkl' = SMPL.

  Args:
    path: body model file.
    h36m_regressor: optional `.npy` [17, V] (e.g. METRO's
      `J_regressor_h36m_correct.npy`); overrides the file's own. Without one,
      a SMPL `.pkl` gets the joint-row + landmark equivalent used by the
      embedded body.
    dtype: float dtype of the arrays.
  """
  path = path or EMBEDDED_BODY
  if not os.path.exists(path):
    raise BodyModelError(
        f'body model file not found: {path!r} (expected the ' "project's .npz or SMPL's .pkl)"
    )
  if path.endswith('.pkl'):
    arrays = _read_smpl_pkl(path)
  elif path.endswith('.npz'):
    arrays = _read_npz(path)
  else:
    raise BodyModelError(
        f'{path!r}: expected a .npz (project format) or a ' '.pkl (SMPL model) file'
    )
  if h36m_regressor:
    arrays['h36m_regressor'] = _read_h36m(h36m_regressor, len(arrays['v_template']))
  return _assemble(arrays, path, dtype)


def _read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:
    raise BodyModelError(f'{path!r}: cannot read as a plain-array .npz: {e}') from e
  missing = [k for k in _NPZ_KEYS if k not in arrays]
  if missing:
    raise BodyModelError(
        f'{path!r}: missing keys {missing}; expected '
        f'{list(_NPZ_KEYS)} (+ h36m_regressor, j24_regressor, '
        f'j24_conf, posedirs, parents)'
    )
  return arrays


def _read_h36m(path, num_vertices):
  if not os.path.exists(path):
    raise BodyModelError(f'H36M regressor file not found: {path!r}')
  try:
    reg = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise BodyModelError(f'{path!r}: cannot read as .npy: {e}') from e
  if reg.shape != (len(joints_lib.H36M_J17_NAMES), num_vertices):
    raise BodyModelError(
        f'{path!r}: H36M regressor has shape {reg.shape}, ' f'expected (17, {num_vertices})'
    )
  return reg


def _assemble(arrays, path, dtype):
  """Validates shapes and fills the derived regressors."""
  v_template = np.asarray(arrays['v_template'], np.float64)
  num_v = len(v_template)
  expected = {
      'v_template': (num_v, 3),
      'weights': (num_v, NUM_JOINTS),
      'j_regressor': (NUM_JOINTS, num_v),
  }
  for key, shape in expected.items():
    if np.shape(arrays[key]) != shape:
      raise BodyModelError(
          f'{path!r}: {key} has shape {np.shape(arrays[key])}, ' f'expected {shape}'
      )
  shapedirs = np.asarray(arrays['shapedirs'], np.float64)
  if shapedirs.ndim != 3 or shapedirs.shape[:2] != (num_v, 3):
    raise BodyModelError(
        f'{path!r}: shapedirs has shape {shapedirs.shape}, ' f'expected ({num_v}, 3, K)'
    )
  parents = tuple(int(p) for p in arrays.get('parents', joints_lib.SMPL_PARENTS))
  if parents != tuple(joints_lib.SMPL_PARENTS):
    raise BodyModelError(
        f"{path!r}: kinematic tree {parents} is not SMPL's " f'{joints_lib.SMPL_PARENTS}'
    )
  faces = np.asarray(arrays['faces'], np.int64)
  if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= num_v:
    raise BodyModelError(
        f'{path!r}: faces must be int [F, 3] indexing {num_v} ' f'vertices; got shape {faces.shape}'
    )
  j_regressor = np.asarray(arrays['j_regressor'], np.float64)
  h36m = arrays.get('h36m_regressor')
  if h36m is None:
    h36m = h36m_equivalent(j_regressor, v_template, arrays['weights'])
  if 'j24_regressor' in arrays:
    j24, conf = arrays['j24_regressor'], arrays['j24_conf']
  else:
    j24, conf = j24_from_h36m(h36m, j_regressor, v_template)
  posedirs = arrays.get('posedirs')
  if posedirs is not None:
    posedirs = np.asarray(posedirs, np.float64)
    if posedirs.shape[:2] == (num_v, 3):  # SMPL layout [V, 3, P]
      posedirs = posedirs.reshape(num_v * 3, -1).T
    if posedirs.ndim != 2 or posedirs.shape[1] != num_v * 3:
      raise BodyModelError(
          f'{path!r}: posedirs has shape {posedirs.shape}, '
          f'expected ({num_v}, 3, P) or (P, {num_v * 3})'
      )
    if posedirs.shape[0] == 0:
      posedirs = None
  as_dtype = lambda x: jnp.asarray(np.asarray(x, np.float64), dtype)
  return BodyModel(
      v_template=as_dtype(v_template),
      shapedirs=as_dtype(shapedirs),
      j_regressor=as_dtype(j_regressor),
      weights=as_dtype(arrays['weights']),
      h36m_regressor=as_dtype(h36m),
      j24_regressor=as_dtype(j24),
      j24_conf=as_dtype(conf),
      faces=StaticArray(faces.astype(np.int32)),
      parents=parents,
      posedirs=None if posedirs is None else as_dtype(posedirs),
      source=path,
  )


def _read_smpl_pkl(path):
  model = model_pickle.load_model(path, 'SMPL', BodyModelError)
  keys = {
      'v_template': 'v_template',
      'shapedirs': 'shapedirs',
      'weights': 'weights',
      'J_regressor': 'j_regressor',
      'f': 'faces',
  }
  missing = [k for k in keys if k not in model]
  if missing:
    raise BodyModelError(f'{path!r}: SMPL pickle lacks keys {missing}; found ' f'{sorted(model)}')
  arrays = {
      ours: model_pickle.array(model[theirs], theirs, path, BodyModelError)
      for theirs, ours in keys.items()
  }
  if 'posedirs' in model:
    arrays['posedirs'] = model_pickle.array(model['posedirs'], 'posedirs', path, BodyModelError)
  if 'kintree_table' in model:
    arrays['parents'] = parents_from_kintree(
        model_pickle.array(model['kintree_table'], 'kintree_table', path, BodyModelError)
    )
  return arrays


def parents_from_kintree(kintree):
  """SMPL's / MANO's kintree_table [2, J] (row 0 parents, root = 2**32-1) -> parents."""
  ids = {int(j): i for i, j in enumerate(kintree[1])}
  return [-1 if i == 0 else ids[int(p)] for i, p in enumerate(kintree[0])]
