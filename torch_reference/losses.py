"""FastMETRO's training loss in PyTorch, for fully labelled batches.

The PyTorch side of the train-step benchmark (benchmarks/train_step.py):
`coarsemetro_jax.losses.compute_loss` without the optional edge-length/normal
terms, for batches where every example carries every label, so the masked
means are plain means, as FastMETRO's losses are. 3D joints (token and
mesh-regressed, L1), 2D re-projection of both (L1), vertices at every mesh
level (L1).
"""

import torch

from coarsemetro_jax import joints as jt


def compute_loss(out, batch, regressor, topology, loss_config):
  """The weighted total loss (a scalar tensor).

  Args:
    out: model output dict of tensors ('pred_cam' [B, 3], 'pred_3d_joints'
      [B, 14, 3], 'pred_3d_vertices_{coarse,intermediate,fine}' [B, V_l, 3]).
    batch: batch dict of tensors (the contract of data_pipelines/__init__.py)
      plus 'gt_vertices' [B, V_0, 3], the body-model mesh.
    regressor: [17, V_0] H36M joint regressor.
    topology: MeshTopology (its `down_indices`).
    loss_config: `config.loss` (the weights).
  """
  c = loss_config
  out = {k: v.float() for k, v in out.items()}
  regress = lambda v: torch.einsum('jv,bvc->bjc', regressor, v)
  hip = lambda j: 0.5 * (j[:, jt.J14_R_HIP] + j[:, jt.J14_L_HIP])[:, None]
  project = lambda x, cam: cam[:, None, :1] * (x[..., :2] + cam[:, None, 1:])

  j17 = regress(out['pred_3d_vertices_fine'])
  pelvis = j17[:, jt.H36M_PELVIS][:, None]
  mesh_joints = j17[:, list(jt.H36M_J17_TO_J14)] - pelvis
  token_joints = out['pred_3d_joints'] - hip(out['pred_3d_joints'])
  gt_fine = batch['gt_vertices'] - regress(batch['gt_vertices'])[:, jt.H36M_PELVIS][:, None]
  gt_vertices = {'fine': gt_fine}
  gt_vertices['intermediate'] = gt_fine[:, torch.from_numpy(topology.down_indices[0])]
  gt_vertices['coarse'] = gt_vertices['intermediate'][:, torch.from_numpy(topology.down_indices[1])]
  j24 = batch['joints_3d']
  gt_3d = j24[:, list(jt.J24_TO_J14), :3] - j24[:, jt.J24_PELVIS, :3][:, None]
  conf_3d = j24[:, list(jt.J24_TO_J14), 3:]
  gt_2d = batch['joints_2d'][:, list(jt.J24_TO_J14)]

  def joints_3d(pred):  # FastMETRO keypoint_3d_loss
    return (conf_3d * (pred - hip(pred) - (gt_3d - hip(gt_3d))).abs()).mean()

  def joints_2d(pred):  # FastMETRO keypoint_2d_loss
    return (gt_2d[..., 2:] * (project(pred, out['pred_cam']) - gt_2d[..., :2]).abs()).mean()

  vertices = sum(
      weight * (out[f'pred_3d_vertices_{level}'] - pelvis - gt_vertices[level]).abs().mean()
      for level, weight in (
          ('coarse', c.vertices_coarse),
          ('intermediate', c.vertices_intermediate),
          ('fine', c.vertices_fine),
      )
  )
  return (
      c.joints_3d * (joints_3d(token_joints) + joints_3d(mesh_joints))
      + c.vertices * vertices
      + c.joints_2d * (joints_2d(token_joints) + joints_2d(mesh_joints))
  )
