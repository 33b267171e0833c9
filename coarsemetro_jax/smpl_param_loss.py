"""Losses of the SMPL-parameter head (FastMETRO's `use_smpl_param_regressor`).

With the head on, the released training loss is

  loss = 1000 x L_smpl + 1e-8 x (the usual loss of losses.compute_loss)

so the regressor trains on a practically frozen network (FastMETRO fine-tunes
on 3DPW with the usual loss at weight 1 instead). L_smpl adds up, unweighted:

* `param_loss`: MSE(pred rotmats, Rodrigues(GT pose)) + 0.1 x MSE(betas),
  over the has_smpl examples (mean over N_smpl x 24 x 9 and N_smpl x 10);
* the losses of the SMPL mesh built from the predicted parameters
  (`smpl_mesh_predictions`: centred at the pelvis of its H36M joints, joints
  J17[H36M_J17_TO_J14]): 3D joints (losses.keypoint_3d_loss), 2D joints of
  the weak-perspective projection with the *detached* predicted camera
  (losses.keypoint_2d_loss) and L1 of the 6890 vertices
  (losses.vertices_loss), with the same flags and normalisation as the
  usual loss.

Labels of examples without them may hold anything (even NaN); they never
reach the value or the gradient. An empty subset gives 0.
"""

import jax
import jax.numpy as jnp

from coarsemetro_jax import body_model as body_model_lib
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import losses

SMPL_WEIGHT = 1000.0  # weight of L_smpl
USUAL_WEIGHT = 1e-8  # weight of the usual loss while the head trains
BETAS_WEIGHT = 0.1
_F32 = jnp.float32


def _masked_mse(pred, target, example_mask):
  """Mean squared error over the selected examples. [B, ...] x2, [B] -> scalar."""
  keep = example_mask.reshape((-1,) + (1,) * (pred.ndim - 1)) > 0
  diff = jnp.where(keep, pred - target, 0.0)  # NaN labels of dropped rows stay out
  count = jnp.sum(example_mask > 0) * pred[0].size
  return jnp.sum(jnp.square(diff)) / jnp.maximum(count, 1.0)


def param_loss(pred_rotmat, pred_betas, pose, betas, has_smpl):
  """MSE(rotmats, Rodrigues(pose)) + 0.1 x MSE(betas) over has_smpl examples.

  Args:
    pred_rotmat: [B, 24, 3, 3]; pred_betas: [B, 10].
    pose: [B, 72] GT axis-angle; betas: [B, 10] GT shape.
    has_smpl: [B] 1 where the example has SMPL labels (and is not padding).
  """
  b = pred_rotmat.shape[0]
  gt_rotmat = body_model_lib.rodrigues(jnp.asarray(pose, _F32).reshape(b, -1, 3))
  return _masked_mse(pred_rotmat.astype(_F32), gt_rotmat, has_smpl) + BETAS_WEIGHT * _masked_mse(
      pred_betas.astype(_F32), jnp.asarray(betas, _F32), has_smpl
  )


def smpl_mesh_predictions(body, regress_h36m, pred_rotmat, pred_betas):
  """The SMPL mesh of the predicted parameters, as the released code centres it.

  Returns dict: vertices_fine [B, V, 3] and mesh_joints [B, 14, 3]
  (J17[H36M_J17_TO_J14]), both minus the pelvis of the H36M joints regressed
  from that mesh (the same normalisation as losses.centre_predictions).
  """
  vertices, _ = body_model_lib.forward_rotmats(body, pred_rotmat, pred_betas)
  vertices = vertices.astype(_F32)  # [B, V, 3]
  j17 = regress_h36m(vertices)  # [B, 17, 3]
  pelvis = j17[:, joint_tables.H36M_PELVIS][:, None]
  return {
      'vertices_fine': vertices - pelvis,
      'mesh_joints': j17[:, joint_tables.H36M_J17_TO_J14] - pelvis,
  }


def smpl_loss(
    outputs, batch, gt_vertices_fine, regress_h36m, topology, body, use_has_2d_joints=False
):
  """L_smpl and its unweighted terms.

  Args:
    outputs: model outputs with pred_rotmat [B, 24, 3, 3], pred_betas [B, 10]
      and pred_cam [B, 3].
    batch: the batch dict (pose, betas, joints_2d, joints_3d, has_*, mask).
    gt_vertices_fine: [B, 6890, 3] body model mesh of the GT (pose, betas).
    regress_h36m: vertices [B, V, 3] -> [B, 17, 3].
    topology: MeshTopology (for losses.ground_truth).
    body: BodyModel that builds the mesh of the predicted parameters.
    use_has_2d_joints: as `config.loss.use_has_2d_joints` of the usual loss.
  Returns:
    (L_smpl, terms): scalar float32 and a dict of named scalar terms.
  """
  gt = losses.ground_truth(batch, gt_vertices_fine, regress_h36m, topology)
  flag = lambda key: jnp.asarray(batch[key], _F32)  # [B]
  mask = flag('mask')
  has_3d = flag('has_3d_joints') * mask
  has_smpl = flag('has_smpl') * mask
  mask_2d = mask * (flag('has_2d_joints') if use_has_2d_joints else 1.0)
  gt_joints_3d = jnp.where(has_3d[:, None, None] > 0, gt['joints_3d'], 0.0)
  gt_vertices = jnp.where(has_smpl[:, None, None] > 0, gt['vertices_fine'], 0.0)
  gt_2d = gt['joints_2d'].at[..., 2].multiply(mask_2d[:, None])  # [B, 14, 3]
  gt_2d = jnp.where(gt_2d[..., 2:] > 0, gt_2d, 0.0)

  pred = smpl_mesh_predictions(body, regress_h36m, outputs['pred_rotmat'], outputs['pred_betas'])
  cam = jax.lax.stop_gradient(jnp.asarray(outputs['pred_cam'], _F32))
  terms = {
      'smpl_params': param_loss(
          outputs['pred_rotmat'], outputs['pred_betas'], batch['pose'], batch['betas'], has_smpl
      ),
      'smpl_joints_3d': losses.keypoint_3d_loss(pred['mesh_joints'], gt_joints_3d, has_3d),
      'smpl_joints_2d': losses.keypoint_2d_loss(
          losses.orthographic_projection(pred['mesh_joints'], cam), gt_2d, mask
      ),
      'smpl_vertices': losses.vertices_loss(pred['vertices_fine'], gt_vertices, has_smpl),
  }
  return sum(terms.values()), terms


def total_loss(smpl_total, usual_total, smpl_weight=SMPL_WEIGHT, usual_weight=USUAL_WEIGHT):
  """`smpl_weight x L_smpl + usual_weight x usual loss` (1000 and 1e-8 as released)."""
  return smpl_weight * smpl_total + usual_weight * usual_total
