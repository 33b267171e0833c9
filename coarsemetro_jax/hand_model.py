"""MANO-format hand model in JAX: linear blend skinning, 21 hand joints, mirroring.

Loads either

* the embedded right hand (`path=''`): `assets/hand_model.npz`, derived from
  CC0 MakeHuman data by `tools/build_hand_assets.py` (778 vertices, 10 shape
  directions, MANO's 16 joints, all-zero pose correctives, identity pose PCA;
  see assets/NOTICE). Its 778 / 195 hierarchy is `EMBEDDED_HAND_HIERARCHY`;
* a `.npz` with MANO's key names (the embedded file's layout);
* MANO's own `MANO_RIGHT.pkl`, a Python 2 pickle of chumpy arrays and a scipy
  sparse J_regressor, through model_pickle's restricted unpickler (neither
  chumpy nor old scipy is needed; any other class is refused).

MANO's 16 joints, kinematic order: wrist 0; index 1-3, middle 4-6, pinky 7-9,
ring 10-12, thumb 13-15 (knuckle outwards). `forward` returns MANO's 778
vertices and the 21 joints of FreiHAND / METRO: wrist, thumb 1-4, index 1-4,
middle 1-4, ring 1-4, pinky 1-4, where joint 4 of a finger is its fingertip
vertex (MANO's mesh: thumb 744, index 320, middle 443, ring 554, pinky 671).
As FastMETRO's MANO layer, no translation is applied.

A left hand is the right one mirrored in x (`mirror`, `mirror_pose`).
"""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import body_model
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import model_pickle

EMBEDDED_HAND = os.path.join(mesh_topology.ASSETS_DIR, 'hand_model.npz')
EMBEDDED_HAND_HIERARCHY = os.path.join(mesh_topology.ASSETS_DIR, 'hand_downsampling.npz')

MANO_JOINT_NAMES = (
    'wrist',
    'index1',
    'index2',
    'index3',
    'middle1',
    'middle2',
    'middle3',
    'pinky1',
    'pinky2',
    'pinky3',
    'ring1',
    'ring2',
    'ring3',
    'thumb1',
    'thumb2',
    'thumb3',
)
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
NUM_MANO_JOINTS = len(MANO_PARENTS)
# Fingertip vertices of MANO's own mesh: thumb, index, middle, ring, pinky.
MANO_TIP_VERTICES = (744, 320, 443, 554, 671)
FINGERS = ('thumb', 'index', 'middle', 'ring', 'pinky')
# The 21 hand joints of FreiHAND / METRO labels.
HAND_JOINT_NAMES = ('wrist',) + tuple(f'{f}{k}' for f in FINGERS for k in range(1, 5))
NUM_HAND_JOINTS = len(HAND_JOINT_NAMES)
# Index of each hand joint in [16 MANO joints; 5 fingertips (FINGERS order)].
HAND_FROM_MANO = tuple(
    MANO_JOINT_NAMES.index(n) if n in MANO_JOINT_NAMES else 16 + FINGERS.index(n[:-1])
    for n in HAND_JOINT_NAMES
)
_POSE_SIZE = 3 * NUM_MANO_JOINTS  # 48
_MIRROR = np.asarray([-1.0, 1.0, 1.0])  # x -> -x
# Axis-angle of a mirrored rotation M R M (M = diag(-1, 1, 1)): (x, -y, -z).
_MIRROR_ROTVEC = np.asarray([1.0, -1.0, -1.0])


class HandModelError(body_model.BodyModelError):
  """A hand-model file is missing, malformed or inconsistent."""


@flax.struct.dataclass
class HandModel:
  """Arrays of a MANO-format hand (a pytree; faces, parents, tips are static).

  Field names follow body_model.BodyModel, so its skinning functions apply.
  """

  v_template: jax.Array  # [V, 3]
  shapedirs: jax.Array  # [V, 3, K]
  j_regressor: jax.Array  # [16, V] dense
  weights: jax.Array  # [V, 16]
  faces: body_model.StaticArray = flax.struct.field(pytree_node=False)  # int [F, 3]
  tip_vertex_ids: tuple[int, ...] = flax.struct.field(pytree_node=False)  # 5, FINGERS order
  parents: tuple[int, ...] = flax.struct.field(pytree_node=False, default=MANO_PARENTS)
  posedirs: jax.Array | None = None  # [135, V * 3] pose correctives
  hands_components: jax.Array | None = None  # [45, 45] pose PCA rows (joints 1-15)
  hands_mean: jax.Array | None = None  # [45] mean finger pose
  side: str = flax.struct.field(pytree_node=False, default='right')
  source: str = flax.struct.field(pytree_node=False, default='')

  @property
  def num_vertices(self):
    return self.v_template.shape[0]

  @property
  def num_betas(self):
    return self.shapedirs.shape[-1]


# ----------------------------------------------------------------------------
# Forward pass.


def forward(hand, pose, betas):
  """MANO linear blend skinning without translation.

  Args:
    hand: HandModel.
    pose: [B, 48] (or [B, 16, 3]) axis-angle; joint 0 is the global orientation.
    betas: [B, K'] shape coefficients, K' <= hand.num_betas.

  Returns:
    vertices [B, V, 3] and the 21 hand joints [B, 21, 3] (HAND_JOINT_NAMES).
  """
  pose = jnp.asarray(pose, hand.v_template.dtype)
  if pose.size != pose.shape[0] * _POSE_SIZE:
    raise ValueError(f'hand pose has shape {pose.shape}; expected [B, 48] or [B, 16, 3]')
  vertices, joints = body_model.forward(hand, pose.reshape(-1, _POSE_SIZE), betas)
  return vertices, hand_joints(hand, vertices, joints)


def hand_joints(hand, vertices, mano_joints):
  """21 hand joints [B, 21, 3] from vertices [B, V, 3] and MANO's 16 joints."""
  tips = vertices[:, list(hand.tip_vertex_ids)]  # [B, 5, 3]
  return jnp.concatenate([mano_joints, tips], 1)[:, list(HAND_FROM_MANO)]


def pose_from_pca(hand, global_orient, coeffs, flat_hand_mean=False):
  """Full pose [B, 48] from a global orientation [B, 3] and pose PCA
  coefficients [B, n] (n <= 45), as MANO's layers do: finger pose =
  coeffs @ hands_components[:n] (+ hands_mean unless flat_hand_mean)."""
  if hand.hands_components is None:
    raise ValueError(f'{hand.source}: this hand model has no pose PCA (hands_components)')
  n = coeffs.shape[-1]
  fingers = jnp.matmul(coeffs, hand.hands_components[:n], precision=jax.lax.Precision.HIGHEST)
  if not flat_hand_mean:
    fingers = fingers + hand.hands_mean
  return jnp.concatenate([global_orient, fingers], -1)


# ----------------------------------------------------------------------------
# Left hands.


def mirror(hand):
  """The left hand: x -> -x, faces' winding flipped (their normals stay outward).

  A left-hand pose drives it as `mirror_pose` of the right-hand pose drives
  the right hand: forward(mirror(h), mirror_pose(p)) = forward(h, p) * (-1, 1, 1).
  """
  m = jnp.asarray(_MIRROR, hand.v_template.dtype)
  posedirs = hand.posedirs
  if posedirs is not None:
    # Corrective of joint rotation R: row (k, i, j) multiplies (R - I)_ij. The
    # mirrored rotation M R M has entries m_i m_j R_ij; outputs flip in x.
    signs = jnp.asarray(np.outer(_MIRROR, _MIRROR).ravel(), posedirs.dtype)  # [9]
    rows = jnp.tile(signs, posedirs.shape[0] // 9)[:, None]  # [135, 1]
    posedirs = posedirs * rows * jnp.tile(m, hand.num_vertices)[None]
  flip = jnp.asarray(np.tile(_MIRROR_ROTVEC, NUM_MANO_JOINTS - 1), hand.v_template.dtype)
  flip_pca = lambda x: None if x is None else x * flip  # [..., 45]
  return hand.replace(
      v_template=hand.v_template * m,
      shapedirs=hand.shapedirs * m[:, None],
      hands_components=flip_pca(hand.hands_components),
      hands_mean=flip_pca(hand.hands_mean),
      faces=body_model.StaticArray(np.asarray(hand.faces)[:, ::-1]),
      posedirs=posedirs,
      side='left' if hand.side == 'right' else 'right',
  )


def mirror_pose(pose):
  """Axis-angle poses [..., 16 * 3] of the mirror image: (x, y, z) -> (x, -y, -z)."""
  shape = pose.shape
  return (pose.reshape(shape[:-1] + (-1, 3)) * _MIRROR_ROTVEC).reshape(shape)


# ----------------------------------------------------------------------------
# Loading.


def load_hand_model(path='', tip_vertex_ids=None, dtype=jnp.float32):
  """Loads a right hand: '' = embedded, '.npz' = MANO's keys, '.pkl' = MANO.

  Args:
    path: hand model file.
    tip_vertex_ids: the 5 fingertip vertices (thumb, index, middle, ring,
      pinky). Default: the file's `tip_vertex_ids`, else MANO's own
      (744, 320, 443, 554, 671), which only fit MANO's mesh.
    dtype: float dtype of the arrays.
  """
  path = path or EMBEDDED_HAND
  if not os.path.exists(path):
    raise HandModelError(
        f'hand model file not found: {path!r} (expected MANO_RIGHT.pkl or a .npz with '
        "MANO's keys)"
    )
  if path.endswith('.pkl'):
    arrays = _read_mano_pkl(path)
  elif path.endswith('.npz'):
    arrays = _read_npz(path)
  else:
    raise HandModelError(f"{path!r}: expected a .npz (MANO's keys) or a .pkl (MANO model) file")
  if tip_vertex_ids is not None:
    arrays['tip_vertex_ids'] = tip_vertex_ids
  return _assemble(arrays, path, dtype)


_REQUIRED = ('v_template', 'shapedirs', 'weights', 'J_regressor', 'f', 'kintree_table')
_OPTIONAL = ('posedirs', 'hands_components', 'hands_mean', 'tip_vertex_ids')


def _read_npz(path):
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:
    raise HandModelError(f'{path!r}: cannot read as a plain-array .npz: {e}') from e
  missing = [k for k in _REQUIRED if k not in arrays]
  if missing:
    raise HandModelError(
        f"{path!r}: missing keys {missing}; expected MANO's {list(_REQUIRED)} "
        f'(+ {list(_OPTIONAL)})'
    )
  return arrays


def _read_mano_pkl(path):
  model = model_pickle.load_model(path, 'MANO', HandModelError)
  missing = [k for k in _REQUIRED if k not in model]
  if missing:
    raise HandModelError(f'{path!r}: MANO pickle lacks keys {missing}; found {sorted(model)}')
  return {
      k: model_pickle.array(model[k], k, path, HandModelError)
      for k in _REQUIRED + _OPTIONAL
      if k in model
  }


def _check_shape(path, key, array, shape):
  if np.shape(array) != shape:
    raise HandModelError(f'{path!r}: {key} has shape {np.shape(array)}, expected {shape}')


def _assemble(arrays, path, dtype):
  """Validates MANO's arrays and builds the HandModel."""
  v_template = np.asarray(arrays['v_template'], np.float64)
  num_v = len(v_template)
  _check_shape(path, 'v_template', v_template, (num_v, 3))
  _check_shape(path, 'weights', arrays['weights'], (num_v, NUM_MANO_JOINTS))
  _check_shape(path, 'J_regressor', arrays['J_regressor'], (NUM_MANO_JOINTS, num_v))
  shapedirs = np.asarray(arrays['shapedirs'], np.float64)
  if shapedirs.ndim != 3 or shapedirs.shape[:2] != (num_v, 3):
    raise HandModelError(
        f'{path!r}: shapedirs has shape {shapedirs.shape}, expected ({num_v}, 3, K)'
    )
  kintree = np.asarray(arrays['kintree_table'])
  if kintree.shape != (2, NUM_MANO_JOINTS):
    raise HandModelError(f'{path!r}: kintree_table has shape {kintree.shape}, expected (2, 16)')
  try:
    parents = tuple(body_model.parents_from_kintree(kintree))
  except KeyError as e:
    raise HandModelError(
        f'{path!r}: kintree_table is not a tree rooted at column 0 (no joint {e})'
    ) from e
  if parents != MANO_PARENTS:
    raise HandModelError(f"{path!r}: kinematic tree {parents} is not MANO's {MANO_PARENTS}")
  faces = np.asarray(arrays['f'], np.int64)
  if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= num_v:
    raise HandModelError(
        f'{path!r}: f must be int [F, 3] indexing {num_v} vertices; got shape {faces.shape}'
    )
  tips = tuple(int(t) for t in np.asarray(arrays.get('tip_vertex_ids', MANO_TIP_VERTICES)))
  if len(tips) != len(FINGERS) or not all(0 <= t < num_v for t in tips):
    raise HandModelError(
        f'{path!r}: fingertip vertices {tips} must be 5 ids below {num_v} '
        "(pass tip_vertex_ids for a mesh other than MANO's)"
    )
  num_pose = 9 * (NUM_MANO_JOINTS - 1)
  posedirs = arrays.get('posedirs')
  if posedirs is not None:
    posedirs = np.asarray(posedirs, np.float64)
    if posedirs.shape == (num_v, 3, num_pose):  # MANO's layout
      posedirs = posedirs.reshape(num_v * 3, num_pose).T
    _check_shape(path, 'posedirs', posedirs, (num_pose, num_v * 3))
    if not posedirs.any():  # the embedded hand: same result without the product
      posedirs = None
  pca = {k: arrays.get(k) for k in ('hands_components', 'hands_mean')}
  if (pca['hands_components'] is None) != (pca['hands_mean'] is None):
    raise HandModelError(f'{path!r}: hands_components and hands_mean come together')
  if pca['hands_components'] is not None:
    _check_shape(path, 'hands_components', pca['hands_components'], (num_pose // 3,) * 2)
    _check_shape(path, 'hands_mean', pca['hands_mean'], (num_pose // 3,))
  as_dtype = lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64), dtype)
  return HandModel(
      v_template=as_dtype(v_template),
      shapedirs=as_dtype(shapedirs),
      j_regressor=as_dtype(arrays['J_regressor']),
      weights=as_dtype(arrays['weights']),
      faces=body_model.StaticArray(faces.astype(np.int32)),
      tip_vertex_ids=tips,
      posedirs=as_dtype(posedirs),
      hands_components=as_dtype(pca['hands_components']),
      hands_mean=as_dtype(pca['hands_mean']),
      source=path,
  )
