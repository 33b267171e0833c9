"""NumPy twin of the body model for the renderer's worker processes.

The renderer runs in worker processes that must not import JAX, so the arrays
of `coarsemetro_jax.body_model.BodyModel` are copied once into a plain
`BodyArrays` and the linear blend skinning is redone here in NumPy (the tests
check it against `body_model.forward`).
"""
import dataclasses

import numpy as np
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
  """The body model's arrays as float64 NumPy (picklable, JAX-free)."""
  v_template: np.ndarray  # [V, 3]
  shapedirs: np.ndarray  # [V, 3, K]
  j_regressor: np.ndarray  # [24, V] (dense)
  weights: np.ndarray  # [V, 24]
  faces: np.ndarray  # [F, 3] int
  j24_regressor: np.ndarray  # [24, V]: J24 joints from vertices
  j24_conf: np.ndarray  # [24]
  parents: np.ndarray = dataclasses.field(default_factory=lambda: PARENTS.copy())

  def rest_joints(self, betas):
    """[24, 3] rest-pose joints of a shape."""
    return self.j_regressor @ self.shaped_vertices(betas)

  def shaped_vertices(self, betas):
    """[V, 3] rest-pose vertices of a shape."""
    k = len(betas)
    return self.v_template + self.shapedirs[:, :, :k] @ np.asarray(betas, np.float64)


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
  rest = body.j_regressor @ v_shaped  # [24, 3]
  rotmats = rotvec_to_matrix(np.asarray(pose, np.float64).reshape(-1, 3))
  posed, rot = forward_kinematics(rest, rotmats, body.parents)
  # Per-joint affine map x -> R x + (posed - R rest), blended by the weights
  # as one [V, 24] @ [24, 12] product (faster than a dense einsum).
  trans = posed - np.einsum('jab,jb->ja', rot, rest)  # [24, 3]
  affine = np.concatenate([rot, trans[:, :, None]], axis=2).reshape(-1, 12)
  blend = (body.weights @ affine).reshape(-1, 3, 4)  # [V, 3, 4]
  verts = np.einsum('vab,vb->va', blend[:, :, :3], v_shaped) + blend[:, :, 3]
  return verts, posed
