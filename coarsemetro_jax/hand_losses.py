"""Training losses of the hand networks: FastMETRO's hand terms on the hand's sets.

The body's terms (losses.py) on 21 hand joints and the 778 / 195 hand meshes,
everything centred at the wrist (hand joint 0), as FastMETRO's FreiHAND
training does:

* GT mesh: the hand model's `forward(pose, betas)` (MANO format,
  hand_model.py), centred at the wrist joint of that forward pass; the 195
  level is the one-hot selection of the centred 778 mesh. A left-hand row
  (`LEFT_KEY` = 1) carries MANO's left-hand pose (the right hand's
  `hand_model.mirror_pose`, as an image flip makes it); its GT mesh is the
  right hand's mesh of the mirrored pose, mirrored in x, i.e. the mesh of
  `hand_model.mirror(hand)` with the same vertex order. A batch without the
  key holds right hands only.
* Predicted mesh: both levels minus the wrist of the 21 joints regressed from
  the predicted 778 mesh (MANO's J_regressor plus the 5 fingertip vertices,
  `regress_joints`); those joints are the mesh joints, centred the same; the
  token joints are centred at their own joint 0.
* 3D joints (L_J): L1 weighted by the GT confidence, both sides re-centred at
  joint 0, mean over N_has3d * 21 * 3, token + mesh joints. The GT joints are
  the batch's `joints_3d` (FastMETRO took those of the GT mesh, the same
  points where labels come from MANO, as FreiHAND's and the synthetic ones).
* Vertices (L_V): `vertices_coarse` / `vertices_fine` (FastMETRO: 0.5 / 0.5) x
  mean L1 over N_has_smpl * V * 3 at 195 / 778; there is no intermediate level.
* 2D re-projection (L_J^2D): as the body's, of both joint sets, over all
  B * 21 * 2 entries (`use_has_2d_joints` as the body's).
* Optional `joints_3d_pa` (mesh joints after Procrustes, losses.py) and
  `vertices_pa` (in neither paper): L1 of the 778 mesh after a similarity
  Procrustes onto the GT mesh (PA-MPVPE's alignment), mean over
  N_has_smpl * V * 3; the rotation and scale are solved on stopped predictions
  as `losses.procrustes_keypoint_3d_loss` does.
* Edge length / normal (`use_edge_normal`; FastMETRO's hand training always
  has them) on the 778 mesh and its faces: `edge_gt` x mean |edge length - GT|
  over the 3 edges of every face (FastMETRO's EdgeLengthGTLoss), plus
  `edge_self` x mean predicted length when > 0 (FastMETRO's hand has none),
  plus `normal` x mean |cos(predicted face edge, GT normal)|.

Availability flags, eval padding and empty subsets as in losses.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import hand_model as hand_model_lib
from coarsemetro_jax import losses

_F32 = jnp.float32
WRIST = hand_model_lib.HAND_JOINT_NAMES.index('wrist')  # 0
# Batch key of the hand side (data_pipelines/__init__.py): [B] float, 1 = left
# hand; a batch without it holds right hands.
LEFT_KEY = 'is_left'
_MIRROR_X = np.asarray([-1.0, 1.0, 1.0], np.float32)


def regress_joints(hand, vertices):
  """The 21 hand joints of meshes: J_regressor's 16 plus the 5 tips. [B, V, 3] -> [B, 21, 3]."""
  mano = jnp.einsum(  # [B, 16, 3]
      'jv,bvc->bjc',
      hand.j_regressor.astype(vertices.dtype),
      vertices,
      precision=jax.lax.Precision.HIGHEST,
  )
  return hand_model_lib.hand_joints(hand, vertices, mano)


def ground_truth_mesh(hand, batch):
  """GT vertices [B, V, 3] and joints [B, 21, 3] of the batch's MANO pose and betas.

  Rows with `batch[LEFT_KEY]` = 1 hold left hands (module docstring): their
  mesh and joints come out mirrored in x.
  """
  pose = jnp.asarray(batch['pose'], _F32)  # [B, 48]
  left = batch.get(LEFT_KEY)
  if left is not None:
    left = jnp.asarray(left, _F32)[:, None] > 0  # [B, 1]
    pose = jnp.where(left, hand_model_lib.mirror_pose(pose), pose)
  vertices, joints = hand_model_lib.forward(hand, pose, jnp.asarray(batch['betas'], _F32))
  if left is not None:
    mirror = lambda x: jnp.where(left[:, :, None], x * _MIRROR_X, x)
    vertices, joints = mirror(vertices), mirror(joints)
  return vertices, joints


def ground_truth(batch, gt_vertices_fine, gt_mesh_joints, topology):
  """Training/eval targets of a hand batch.

  Args:
    batch: hand batch dict (joints_2d [B, 21, 3], joints_3d [B, 21, 4]).
    gt_vertices_fine: [B, 778, 3] `ground_truth_mesh` vertices.
    gt_mesh_joints: [B, 21, 3] its joints (the wrist centres the mesh).
    topology: hand MeshTopology; level 1 is a selection of level 0.
  Returns:
    dict: vertices_{fine,coarse} centred at the GT mesh's wrist; joints_3d
    [B, 21, 4] (xyz minus joint 0, confidence); joints_2d [B, 21, 3].
  """
  wrist = jnp.asarray(gt_mesh_joints, _F32)[:, WRIST, None]  # [B, 1, 3]
  fine = jnp.asarray(gt_vertices_fine, _F32) - wrist
  j3d = jnp.asarray(batch['joints_3d'], _F32)  # [B, 21, 4]
  j3d = jnp.concatenate([j3d[..., :3] - j3d[:, WRIST, None, :3], j3d[..., 3:]], -1)
  return {
      'vertices_fine': fine,
      'vertices_coarse': topology.downsample(fine, 0, 1),
      'joints_3d': j3d,
      'joints_2d': jnp.asarray(batch['joints_2d'], _F32),
  }


def centre_predictions(outputs, hand):
  """Hand outputs centred at the wrist of the joints regressed from the 778 mesh (float32).

  Returns dict: vertices_{fine,coarse}, mesh_joints [B, 21, 3] (minus that
  wrist), token_joints [B, 21, 3] (minus their own joint 0), cam [B, 3].
  """
  out = {k: jnp.asarray(v, _F32) for k, v in outputs.items()}
  mesh_joints = regress_joints(hand, out['pred_3d_vertices_fine'])  # [B, 21, 3]
  wrist = mesh_joints[:, WRIST, None]  # [B, 1, 3]
  token = out['pred_3d_joints']
  return {
      'vertices_fine': out['pred_3d_vertices_fine'] - wrist,
      'vertices_coarse': out['pred_3d_vertices_coarse'] - wrist,
      'mesh_joints': mesh_joints - wrist,
      'token_joints': token - token[:, WRIST, None],
      'cam': out['pred_cam'],
  }


def keypoint_3d_loss(pred, gt, has_3d):
  """FastMETRO's hand `keypoint_3d_loss` (L1, both sides re-centred at joint 0).

  pred [B, 21, 3], gt [B, 21, 4] (xyz, confidence), has_3d [B] -> mean over
  N_has3d * 21 * 3 of conf * |pred - gt|.
  """
  conf = gt[..., 3:]  # [B, 21, 1]
  gt = gt[..., :3] - gt[:, WRIST, None, :3]
  pred = pred - pred[:, WRIST, None]
  err = conf * jnp.abs(pred - gt)  # [B, 21, 3]
  return losses.masked_mean(err, has_3d, jnp.sum(has_3d > 0))


def procrustes_vertices_loss(pred, gt, has_smpl):
  """Mean L1 of pred [B, V, 3] after its similarity Procrustes onto gt [B, V, 3] (has_smpl [B])."""
  sr, mu_t = losses.similarity_transform(jax.lax.stop_gradient(pred), gt)
  aligned = jnp.einsum('bij,bnj->bni', sr, pred - pred.mean(1, keepdims=True)) + mu_t
  return losses.vertices_loss(aligned, gt, has_smpl)


def face_edges(faces):
  """The 3 edges of every face, [3F, 2]: FastMETRO's edge loss averages over these."""
  faces = np.asarray(faces, np.int32)
  return faces[:, [0, 1, 0, 2, 1, 2]].reshape(-1, 2)


def compute_loss(outputs, batch, gt_vertices_fine, gt_mesh_joints, hand, topology, loss_config):
  """The weighted total hand loss and its unweighted terms.

  Args:
    outputs: hand network output dict (`models.fastmetro.hand_mesh_outputs`).
    batch: hand batch dict.
    gt_vertices_fine, gt_mesh_joints: `ground_truth_mesh(hand, batch)`.
    hand: hand_model.HandModel (its regressor and fingertips).
    topology: hand MeshTopology (levels 778 / 195; faces of level 0).
    loss_config: `config.loss` (configs/hand_r50.py).
  Returns:
    (total, terms): scalar float32 and a dict of named scalar terms.
  """
  c = loss_config
  pred = centre_predictions(outputs, hand)
  gt = dict(ground_truth(batch, gt_vertices_fine, gt_mesh_joints, topology))
  flag = lambda key: jnp.asarray(batch[key], _F32)  # [B]
  mask = flag('mask')
  has_3d = flag('has_3d_joints') * mask
  has_smpl = flag('has_smpl') * mask
  mask_2d = mask * (flag('has_2d_joints') if c.use_has_2d_joints else 1.0)

  gt = losses.zero_missing_labels(gt, has_3d, has_smpl, ('coarse', 'fine'))

  terms = {}
  terms['joints_3d_token'] = keypoint_3d_loss(pred['token_joints'], gt['joints_3d'], has_3d)
  terms['joints_3d_mesh'] = keypoint_3d_loss(pred['mesh_joints'], gt['joints_3d'], has_3d)
  terms['joints_3d'] = terms['joints_3d_token'] + terms['joints_3d_mesh']
  if c.joints_3d_pa:
    terms['joints_3d_pa'] = losses.procrustes_keypoint_3d_loss(
        pred['mesh_joints'], gt['joints_3d'], has_3d
    )
  for level in ('coarse', 'fine'):
    key = f'vertices_{level}'
    terms[key] = losses.vertices_loss(pred[key], gt[key], has_smpl)
  terms['vertices'] = (
      c.vertices_coarse * terms['vertices_coarse'] + c.vertices_fine * terms['vertices_fine']
  )
  if c.vertices_pa:
    terms['vertices_pa'] = procrustes_vertices_loss(
        pred['vertices_fine'], gt['vertices_fine'], has_smpl
    )
  gt_2d = gt['joints_2d'].at[..., 2].multiply(mask_2d[:, None])  # [B, 21, 3]
  gt_2d = jnp.where(gt_2d[..., 2:] > 0, gt_2d, 0.0)
  for name in ('token', 'mesh'):
    projected = losses.orthographic_projection(pred[f'{name}_joints'], pred['cam'])
    terms[f'joints_2d_{name}'] = losses.keypoint_2d_loss(projected, gt_2d, mask)
  terms['joints_2d'] = terms['joints_2d_token'] + terms['joints_2d_mesh']

  total = (
      c.joints_3d * terms['joints_3d']
      + c.vertices * terms['vertices']
      + c.joints_2d * terms['joints_2d']
  )
  for name in ('joints_3d_pa', 'vertices_pa'):
    if name in terms:
      total = total + c[name] * terms[name]
  if c.use_edge_normal:
    faces = topology.faces[0]
    p, g = pred['vertices_fine'], gt['vertices_fine']
    terms['edge_gt'] = losses.edge_length_gt_loss(p, g, face_edges(faces), has_smpl)
    terms['normal'] = losses.normal_vector_loss(p, g, faces, has_smpl)
    terms['edge_normal'] = c.edge_gt * terms['edge_gt'] + c.normal * terms['normal']
    if c.edge_self:
      terms['edge_self'] = losses.edge_length_self_loss(p, face_edges(faces), has_smpl)
      terms['edge_normal'] = terms['edge_normal'] + c.edge_self * terms['edge_self']
    total = total + c.edge_normal * terms['edge_normal']
  return total, terms
