"""NumPy twin of the MANO-format hand model for the renderer's worker processes.

As `body_np` for the body: the arrays of `coarsemetro_jax.hand_model.HandModel`
are copied once (in the parent, which may use JAX) into a plain, picklable
`HandArrays`, and the skinning is `body_np.lbs` (the same linear blend skinning
on MANO's 16-joint tree). The 21 hand joints are MANO's 16 joints plus the 5
fingertip vertices, in FreiHAND's order (`hand_model.HAND_JOINT_NAMES`); the
tests check both against `hand_model.forward`.
"""

import dataclasses

import numpy as np
import scipy.sparse

from data_pipelines.synthetic import body_np


@dataclasses.dataclass(frozen=True)
class HandArrays:
  """A hand model's arrays as float64 NumPy (picklable, JAX-free)."""

  v_template: np.ndarray  # [V, 3]
  shapedirs: np.ndarray  # [V, 3, K]
  j_regressor: np.ndarray  # [16, V] (dense)
  weights: np.ndarray  # [V, 16]
  faces: np.ndarray  # [F, 3] int, wound as the model's (outwards for both sides)
  parents: np.ndarray  # [16] MANO's kinematic tree
  tip_vertex_ids: tuple  # 5 fingertip vertices: thumb, index, middle, ring, pinky
  hand_from_mano: tuple  # [21] index of each hand joint in [16 joints; 5 tips]
  side: str = 'right'  # 'right' or 'left' (hand_model.mirror)
  # [V * 3, 135] pose correctives on the flattened (R_j - I), j = 1..15, or
  # None when the model has none (the embedded hand).
  posedirs: np.ndarray | None = None

  def __post_init__(self):
    # Sparse products: single-threaded, so the numbers do not depend on the
    # BLAS thread count (body_np.BodyArrays).
    csr = {n: scipy.sparse.csr_matrix(getattr(self, n)) for n in ('j_regressor', 'weights')}
    object.__setattr__(self, '_csr', csr)

  def regress(self, name, points):
    """`getattr(self, name) @ points` for 'j_regressor' or 'weights'."""
    return self._csr[name] @ points

  def shaped_vertices(self, betas):
    """[V, 3] rest-pose vertices of a shape."""
    k = len(betas)
    offsets = np.einsum('vck,k->vc', self.shapedirs[:, :, :k], np.asarray(betas, np.float64))
    return self.v_template + offsets

  def rest_joints(self, betas):
    """[16, 3] rest-pose MANO joints of a shape."""
    return self.regress('j_regressor', self.shaped_vertices(betas))

  def hand_joints(self, vertices, mano_joints):
    """[21, 3] hand joints (FreiHAND order) from vertices [V, 3] and MANO's 16 joints."""
    return np.concatenate([mano_joints, vertices[list(self.tip_vertex_ids)]])[
        list(self.hand_from_mano)
    ]

  def rest_hand_joints(self, betas):
    """[21, 3] hand joints of the rest pose of a shape."""
    v = self.shaped_vertices(betas)
    return self.hand_joints(v, self.regress('j_regressor', v))


def lbs(hand, pose, betas):
  """MANO skinning without translation, as `hand_model.forward` for one sample.

  Args:
    hand: HandArrays.
    pose: [48] axis-angle (joint 0: global orientation).
    betas: [K] shape coefficients.

  Returns:
    vertices [V, 3] and the 21 hand joints [21, 3].
  """
  verts, mano_joints = body_np.lbs(hand, pose, betas)
  return verts, hand.hand_joints(verts, mano_joints)


def from_hand_model(hand):
  """HandArrays (float64 NumPy) from a `coarsemetro_jax.hand_model.HandModel`."""
  # Imported here: worker processes use HandArrays and never import JAX.
  from coarsemetro_jax import hand_model

  f64 = lambda x: np.array(x, np.float64)
  v_template = f64(hand.v_template)
  posedirs = None
  if hand.posedirs is not None:  # [135, V * 3] -> body_np.lbs's [V * 3, 135]
    posedirs = f64(hand.posedirs).T
  return HandArrays(
      v_template=v_template,
      shapedirs=f64(hand.shapedirs),
      j_regressor=f64(hand.j_regressor),
      weights=f64(hand.weights),
      faces=np.array(hand.faces, np.int64),
      parents=np.array(hand.parents, np.int64),
      tip_vertex_ids=tuple(int(t) for t in hand.tip_vertex_ids),
      hand_from_mano=tuple(hand_model.HAND_FROM_MANO),
      side=hand.side,
      posedirs=posedirs,
  )
