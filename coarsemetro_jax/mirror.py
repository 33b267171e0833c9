"""Mirror (flip) test: average a prediction with that of the mirrored image.

The model runs on the image and on its left-right mirror; the mirrored
prediction is mapped back (x negated, left and right swapped) and the two are
averaged before the metrics. This is test-time augmentation (as HRNet's and
mmpose's `flip_test`), not part of the METRO/FastMETRO evaluation protocol;
`config.eval_flip` turns it on.

Mapping back: the weak-perspective camera projects `s * (X[:, :2] + t)` in
crop units centred on the crop, so mirroring the image maps every 3D point
(x, y, z) to (-x, y, z) and the camera (s, tx, ty) to (s, -tx, ty). Left and
right swap through `joints.J14_FLIP_PERM` for the joint tokens, and through a
vertex permutation of the fine mesh found on the body model's template:
vertex i's partner is the template vertex nearest to i mirrored at x = 0
(SMPL's template, like the embedded body, is left-right symmetric). The
coarser levels' vertex samplings are not symmetric (embedded hierarchy: mirror
partners up to 51 / 86 mm apart at 1723 / 431 vertices), so the averaged output
has the fine mesh, the joint tokens and the camera, which is all the metrics
use (they regress the joints from the fine mesh).
"""

import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import joints as joint_tables

# Mirrored partners farther apart than this on the template mean the body
# model is not left-right symmetric about x = 0 (metres).
MAX_MIRROR_DISTANCE = 0.02
_MIRROR_X = (-1.0, 1.0, 1.0)
FLIPPED_KEYS = ('pred_3d_vertices_fine', 'pred_3d_joints', 'pred_cam')


def mirror_permutation(vertices, max_distance=MAX_MIRROR_DISTANCE):
  """Index of every vertex's mirror partner (nearest to it mirrored at x = 0).

  Args:
    vertices: [V, 3] a symmetric rest mesh (x = left-right).
    max_distance: largest allowed distance between a mirrored vertex and its
      partner.
  Returns:
    int32 [V].
  Raises:
    ValueError: the mesh is not left-right symmetric about x = 0.
  """
  v = np.asarray(vertices, np.float64)
  mirrored = v * np.asarray(_MIRROR_X)
  partner = np.empty(len(v), np.int64)
  distance = np.empty(len(v))
  sq_norm = np.sum(v * v, 1)
  for start in range(0, len(v), 1024):  # [1024, V] blocks
    m = mirrored[start : start + 1024]
    d2 = np.sum(m * m, 1)[:, None] - 2.0 * m @ v.T + sq_norm[None]
    partner[start : start + 1024] = d2.argmin(1)
    distance[start : start + 1024] = np.sqrt(np.maximum(d2.min(1), 0.0))
  worst = int(distance.argmax())
  if distance[worst] > max_distance:
    raise ValueError(
        f'the body model template is not left-right symmetric about x = 0: vertex '
        f'{worst} mirrored is {1000 * distance[worst]:.1f} mm from the nearest vertex '
        f'(at most {1000 * max_distance:.0f} mm allowed); the flip test '
        '(config.eval_flip) needs a symmetric template'
    )
  return partner.astype(np.int32)


def unflip_outputs(outputs, vertex_perm, joint_perm=joint_tables.J14_FLIP_PERM):
  """Outputs on a mirrored image mapped back to the original one (`FLIPPED_KEYS`).

  Args:
    outputs: model output dict with pred_3d_vertices_fine [B, V, 3],
      pred_3d_joints [B, J, 3] and pred_cam [B, 3].
    vertex_perm: int [V], `mirror_permutation` of the fine template; None for
      none (a hand: the mirror image of a right hand is a left hand with the
      same vertex order, `hand_flip_test`).
    joint_perm: the joint tokens' left-right swap (J14's); None for none.
  Returns:
    dict of `FLIPPED_KEYS`.
  """

  def mirror(x):
    return x * jnp.asarray(_MIRROR_X, x.dtype)

  def permute(x, perm):
    return x if perm is None else x[:, perm]

  cam = outputs['pred_cam']
  return {
      'pred_3d_vertices_fine': mirror(permute(outputs['pred_3d_vertices_fine'], vertex_perm)),
      'pred_3d_joints': mirror(permute(outputs['pred_3d_joints'], joint_perm)),
      'pred_cam': cam * jnp.asarray((1.0, -1.0, 1.0), cam.dtype),
  }


def flip_averaged_outputs(apply_fn, images, vertex_perm, joint_perm=joint_tables.J14_FLIP_PERM):
  """`apply_fn(images)` with `FLIPPED_KEYS` averaged with the mirrored image's.

  The other outputs (the coarser mesh levels) are the plain prediction's.
  Args:
    apply_fn: images [B, H, W, 3] -> model output dict.
    images: [B, H, W, 3].
    vertex_perm, joint_perm: as `unflip_outputs`.
  """
  plain = apply_fn(images)
  mirrored = unflip_outputs(apply_fn(images[:, :, ::-1]), vertex_perm, joint_perm)
  return {**plain, **{k: 0.5 * (plain[k] + mirrored[k]) for k in FLIPPED_KEYS}}


def hand_flip_test(apply_fn, images):
  """The flip test of a hand network that predicts both hands.

  The mirrored image shows the other hand; its predicted mesh mirrored in x
  is this hand's, vertex for vertex and joint for joint (the left hand is the
  right one mirrored, hand_model.mirror), so nothing is permuted. A network
  trained on right hands only (FreiHAND) sees a left hand in the mirrored
  image, outside what it learnt.
  """
  return flip_averaged_outputs(apply_fn, images, None, None)
