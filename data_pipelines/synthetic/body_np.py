"""NumPy twin of the body model for the renderer's worker processes.

The renderer runs in worker processes that must not import JAX, so the arrays
of `coarsemetro_jax.body_model.BodyModel` are copied once into a plain
`BodyArrays` and the linear blend skinning is redone here in NumPy (the tests
check it against `body_model.forward`).
"""

import dataclasses

import numpy as np
import scipy.sparse
from scipy.spatial.transform import Rotation

from coarsemetro_jax import joints as joints_lib

PARENTS = np.asarray(joints_lib.SMPL_PARENTS)


def rotvec_to_matrix(rotvec):
  """Rodrigues' formula. [..., 3] axis-angle -> [..., 3, 3] rotation matrices."""
  rotvec = np.asarray(rotvec, np.float64)
  return Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_matrix().reshape(rotvec.shape[:-1] + (3, 3))


def matrix_to_rotvec(mat):
  """[..., 3, 3] rotation matrices -> [..., 3] axis-angle (norm in [0, pi])."""
  mat = np.asarray(mat, np.float64)
  return Rotation.from_matrix(mat.reshape(-1, 3, 3)).as_rotvec().reshape(mat.shape[:-2] + (3,))


def axis_rotation(axis, angle):
  """Rotation matrix by `angle` radians about the unit vector `axis`."""
  return rotvec_to_matrix(np.asarray(axis, np.float64) * angle)


def forward_kinematics(rest_joints, rotmats, parents=PARENTS):
  """Posed joints and global transforms of a kinematic tree.

  Args:
    rest_joints: [J, 3] rest-pose joint locations.
    rotmats: [J, 3, 3] local rotations (joint 0: the global orientation).
    parents: [J] parent indices, parents before children.

  Returns:
    posed joints [J, 3] (joint 0 stays at its rest location) and global
    rotations [J, 3, 3].
  """
  num = len(parents)
  rot = np.empty((num, 3, 3))
  pos = np.empty((num, 3))
  rot[0] = rotmats[0]
  pos[0] = rest_joints[0]
  for j in range(1, num):
    p = parents[j]
    rot[j] = rot[p] @ rotmats[j]
    pos[j] = pos[p] + rot[p] @ (rest_joints[j] - rest_joints[p])
  return pos, rot


@dataclasses.dataclass(frozen=True)
class BodyArrays:
  """The body model's arrays as float64 NumPy (picklable, JAX-free).

  Products with the skinning weights and the regressors go through CSR copies
  (`regress`, `lbs`): SciPy's sparse products are single-threaded, so an
  example's numbers do not depend on how many BLAS threads the process has
  (a multi-threaded dense matmul rounds differently), and they are faster.
  """

  v_template: np.ndarray  # [V, 3]
  shapedirs: np.ndarray  # [V, 3, K]
  j_regressor: np.ndarray  # [24, V] (dense)
  weights: np.ndarray  # [V, 24]
  faces: np.ndarray  # [F, 3] int
  j24_regressor: np.ndarray  # [24, V]: J24 joints from vertices
  j24_conf: np.ndarray  # [24]
  parents: np.ndarray = dataclasses.field(default_factory=lambda: PARENTS.copy())
  # [V * 3, 207] pose correctives on the flattened (R_j - I), j = 1..23, or
  # None when the model has none (the embedded body).
  posedirs: np.ndarray | None = None

  def __post_init__(self):
    csr = {
        name: scipy.sparse.csr_matrix(getattr(self, name))
        for name in ('j_regressor', 'weights', 'j24_regressor')
    }
    object.__setattr__(self, '_csr', csr)

  def regress(self, name, points):
    """`getattr(self, name) @ points` for 'j_regressor', 'weights' or 'j24_regressor'."""
    return self._csr[name] @ points

  def rest_joints(self, betas):
    """[24, 3] rest-pose joints of a shape."""
    return self.regress('j_regressor', self.shaped_vertices(betas))

  def shaped_vertices(self, betas):
    """[V, 3] rest-pose vertices of a shape."""
    k = len(betas)
    offsets = np.einsum('vck,k->vc', self.shapedirs[:, :, :k], np.asarray(betas, np.float64))
    return self.v_template + offsets


def lbs(body, pose, betas):
  """Linear blend skinning, no translation.

  Args:
    body: BodyArrays.
    pose: [72] axis-angle (joint 0: global orientation).
    betas: [K] shape coefficients.

  Returns:
    vertices [V, 3] and joints [24, 3], as `body_model.forward` for one sample.
  """
  v_shaped = body.shaped_vertices(betas)  # [V, 3]
  rest = body.regress('j_regressor', v_shaped)  # [24, 3]
  rotmats = rotvec_to_matrix(np.asarray(pose, np.float64).reshape(-1, 3))
  posed, rot = forward_kinematics(rest, rotmats, body.parents)
  if body.posedirs is not None:  # Pose correctives, in the rest pose.
    feature = (rotmats[1:] - np.eye(3)).reshape(-1)  # [207]
    v_shaped = v_shaped + np.einsum('ip,p->i', body.posedirs, feature).reshape(-1, 3)
  # Per-joint affine map x -> R x + (posed - R rest), blended by the weights
  # as one sparse [V, 24] @ [24, 12] product.
  trans = posed - np.einsum('jab,jb->ja', rot, rest)  # [24, 3]
  affine = np.concatenate([rot, trans[:, :, None]], axis=2).reshape(-1, 12)
  blend = body.regress('weights', affine).reshape(-1, 3, 4)  # [V, 3, 4]
  verts = np.einsum('vab,vb->va', blend[:, :, :3], v_shaped) + blend[:, :, 3]
  return verts, posed


def from_body_model(body):
  """BodyArrays (float64 NumPy) from a `coarsemetro_jax.body_model.BodyModel`."""
  # Imported here: worker processes use BodyArrays and never import JAX.
  from coarsemetro_jax import body_model

  f64 = lambda x: np.array(x, np.float64)
  v_template = f64(body.v_template)
  num_v = len(v_template)
  posedirs = None
  if getattr(body, 'posedirs', None) is not None:
    posedirs = f64(body.posedirs)
    posedirs = posedirs.reshape(num_v * 3, -1) if posedirs.shape[0] == num_v else posedirs.T
    if not np.any(posedirs):
      posedirs = None
  if getattr(body, 'j24_regressor', None) is not None:
    j24 = _dense(body.j24_regressor)
    conf = np.array(body_model.j24_joints(body, v_template[None])[1], np.float64)
  else:
    j24, conf = j24_regressor(body, body_model.j24_joints, num_v)
  return BodyArrays(
      v_template=v_template,
      shapedirs=f64(body.shapedirs),
      j_regressor=_dense(body.j_regressor),
      weights=f64(body.weights),
      faces=np.array(body.faces, np.int64),
      j24_regressor=j24,
      j24_conf=conf,
      parents=np.array(body.parents, np.int64),
      posedirs=posedirs,
  )


def _dense(matrix):
  return np.array(matrix.toarray() if hasattr(matrix, 'toarray') else matrix, np.float64)


def j24_regressor(body, j24_fn, num_vertices):
  """The [24, V] matrix of the linear map `j24_fn(body, vertices)`, and its conf [24].

  J24 joints are linear in the vertices and act on each coordinate alike, so
  feeding the three coordinates of a one-hot vertex batch reads the matrix off
  in blocks (no assumption about how the body model combines its regressors).
  """
  import jax

  fn = jax.jit(lambda v: j24_fn(body, v)[0])
  rows = []
  block = 512
  for start in range(0, num_vertices, block):
    n = min(block, num_vertices - start)
    probe = np.zeros((n, num_vertices, 3), np.float32)
    probe[np.arange(n), start + np.arange(n), 0] = 1.0  # x of vertex start + i
    out = np.asarray(fn(probe), np.float64)  # [n, 24, 3]
    if np.abs(out[:, :, 1:]).max() > 1e-6:
      raise ValueError('j24_joints mixes coordinates; expected a [24, V] regressor')
    rows.append(out[:, :, 0].T)
  _, conf = j24_fn(body, np.zeros((1, num_vertices, 3), np.float32))
  return np.concatenate(rows, axis=1), np.array(conf, np.float64)
