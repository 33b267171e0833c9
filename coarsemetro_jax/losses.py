"""Training losses of CoarseMETRO (paper Sec. 3.3) with FastMETRO's exact terms.

Everything follows FastMETRO's `run_train` and its loss functions:

* GT mesh: `SMPL(pose, betas)` (computed by the caller with the JAX body
  model), centred at the pelvis that the H36M regressor finds on it; the 1723
  and 431 levels are one-hot selections of the centred fine mesh.
* Predicted mesh: every level is shifted by the pelvis of the H36M joints
  regressed from the predicted fine mesh; the mesh joints are
  `J17[H36M_J17_TO_J14] - pelvis`; the token joints are centred at their hip
  midpoint. GT 3D joints are `joints_3d[J24_TO_J14]` minus the J24 pelvis.
* 3D joints (L_J): L1 weighted by the GT confidence, both sides re-centred at
  the hip midpoint, mean over N_has3d * 14 * 3, token + mesh joints.
* Vertices (L_V): 0.25 / 0.5 / 0.25 x mean L1 over N_has_smpl * V * 3 at the
  431 / 1723 / 6890 levels.
* 2D re-projection (L_J^2D): L1 weighted by visibility of the weak-perspective
  projection `s * (X[:, :2] + t)` of both centred joint sets, mean over **all**
  B * 14 * 2 entries (`has_2d_joints` is ignored, as FastMETRO does, unless
  `use_has_2d_joints`).
* Optional Procrustes-aligned 3D joints (`joints_3d_pa` > 0; in neither
  paper): L1 of the mesh J14 after PA-MPJPE's similarity alignment onto the
  GT, same weighting and normalisation as L_J; used by configs/embedded.py.
* Optional edge-length / normal terms on the 1723 mesh (FastMETRO's code; not
  in either paper): 5 * edge-length vs GT + 1e-4 * own edge length + 0.1 *
  |cos| between predicted face edges and the GT normal, over `has_smpl`; the
  faces are the triangles of the level's edge graph (= FastMETRO's file).

The availability flags are the paper's alpha (has_3d_joints / has_smpl) and
beta (2D visibility) of L_total. Eval padding (`mask`) removes an example from
every term. Normalisation is over the global batch (under jit the batch is
global); PyTorch DDP normalised per GPU and averaged the gradients, which is
the same whenever the labelled subsets are spread evenly. An empty subset
gives 0 (and zero gradient), never NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import joints as joint_tables

_F32 = jnp.float32


def orthographic_projection(points, camera):
  """Weak perspective `s * (X[..., :2] + [tx, ty])`. [B,N,3], [B,3] -> [B,N,2]."""
  return camera[:, None, :1] * (points[..., :2] + camera[:, None, 1:])


def hip_centre(joints_j14):
  """Midpoint of the two J14 hips. [B, 14, C] -> [B, C]."""
  return 0.5 * (joints_j14[:, joint_tables.J14_R_HIP] + joints_j14[:, joint_tables.J14_L_HIP])


def masked_mean(values, example_mask, num_examples):
  """sum(values over selected examples) / (num_examples * per-example size).

  `jnp.where` (not a product) keeps NaN/inf of unselected examples out of the
  value and the gradient; an empty subset gives 0.
  """
  per_example = values[0].size
  keep = example_mask.reshape((-1,) + (1,) * (values.ndim - 1)) > 0
  total = jnp.where(keep, values, 0.0).sum()
  return total / jnp.maximum(num_examples * per_example, 1.0)


def keypoint_3d_loss(pred, gt, has_3d):
  """FastMETRO's `keypoint_3d_loss` (L1).

  Args:
    pred: [B, 14, 3] predicted joints.
    gt: [B, 14, 4] GT joints (x, y, z, confidence).
    has_3d: [B] 1 where the example has 3D joints.
  Returns:
    mean over N_has3d * 14 * 3 of conf * |pred - gt| after centring both at
    the hip midpoint.
  """
  conf = gt[..., 3:]  # [B, 14, 1]
  gt = gt[..., :3] - hip_centre(gt[..., :3])[:, None]
  pred = pred - hip_centre(pred)[:, None]
  err = conf * jnp.abs(pred - gt)  # [B, 14, 3]
  return masked_mean(err, has_3d, jnp.sum(has_3d > 0))


def keypoint_2d_loss(pred, gt, mask):
  """FastMETRO's `keypoint_2d_loss` (L1).

  Args:
    pred: [B, 14, 2] projected joints.
    gt: [B, 14, 3] GT (x, y in [-1, 1], visibility).
    mask: [B] examples that count (all 1 in training: the mean runs over all
      B * 14 * 2 entries, visibility only gates the numerator).
  """
  err = gt[..., 2:] * jnp.abs(pred - gt[..., :2])  # [B, 14, 2]
  return masked_mean(err, mask, jnp.sum(mask > 0))


def similarity_transform(source, target):
  """The similarity transform that best maps source onto target.

  Batched jnp version of METRO's `compute_similarity_transform`.
  Args:
    source, target: [B, N, 3].
  Returns:
    (sr [B, 3, 3], t [B, 1, 3]) with `x -> (x - mean(source)) @ sr^T + t`
    minimising the squared error; sr = scale * R with R a proper rotation
    (det +1) and t the target's centroid. A degenerate source (all points
    equal) gets sr = 0 (maps to the target's centroid).
  """
  mu_s = source.mean(1, keepdims=True)
  mu_t = target.mean(1, keepdims=True)
  xs, xt = source - mu_s, target - mu_t  # [B, N, 3]
  var_s = jnp.sum(xs * xs, axis=(1, 2))  # [B]
  k = jnp.einsum('bni,bnj->bij', xs, xt)  # [B, 3, 3] = X1 X2^T
  u, _, vh = jnp.linalg.svd(k)
  v = jnp.swapaxes(vh, -1, -2)
  # R = V Z U^T with Z = diag(1, 1, sign(det(V U^T))) removes reflections.
  det = jnp.linalg.det(jnp.einsum('bij,bkj->bik', v, u))
  z = jnp.ones_like(k[:, 0]).at[:, -1].set(jnp.where(det < 0, -1.0, 1.0))  # [B, 3]
  r = jnp.einsum('bij,bj,bkj->bik', v, z, u)  # [B, 3, 3]
  scale = jnp.einsum('bij,bji->b', r, k) / jnp.maximum(var_s, 1e-12)  # tr(RK)/|X1|^2
  return scale[:, None, None] * r, mu_t


def procrustes_keypoint_3d_loss(pred, gt, has_3d):
  """L1 of the J14 after a similarity Procrustes of pred onto GT (PA-MPJPE's alignment).

  Rotation and scale are solved on stopped predictions, so the gradient flows
  through the aligned joints only (for a squared error this is the exact
  gradient, by the optimality of the alignment) and never through the SVD;
  the centring is not stopped, so the loss ignores a shift of pred. Same
  normalisation as `keypoint_3d_loss`; GT confidence weights the error, not
  the alignment.
  """
  conf = gt[..., 3:]  # [B, 14, 1]
  gt = gt[..., :3]
  sr, mu_t = similarity_transform(jax.lax.stop_gradient(pred), gt)
  centred = pred - pred.mean(1, keepdims=True)  # [B, 14, 3]
  aligned = jnp.einsum('bij,bnj->bni', sr, centred) + mu_t
  err = conf * jnp.abs(aligned - gt)  # [B, 14, 3]
  return masked_mean(err, has_3d, jnp.sum(has_3d > 0))


def vertices_loss(pred, gt, has_smpl):
  """Mean L1 over N_has_smpl * V * 3. [B, V, 3] x2, [B] -> scalar."""
  return masked_mean(jnp.abs(pred - gt), has_smpl, jnp.sum(has_smpl > 0))


def _edge_lengths(vertices, edges):
  d = vertices[:, edges[:, 0]] - vertices[:, edges[:, 1]]  # [B, E, 3]
  return jnp.sqrt(jnp.sum(d * d, -1) + 1e-8)  # [B, E]


def _normalize(v):
  """v / max(|v|, 1e-12) as torch's F.normalize, with a finite gradient at 0."""
  return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), 1e-24))


def edge_length_gt_loss(pred, gt, edges, has_smpl):
  """Pose2Mesh/FastMETRO `EdgeLengthGTLoss` (uniform): mean |len_pred - len_gt|."""
  diff = jnp.abs(_edge_lengths(pred, edges) - _edge_lengths(gt, edges))
  return masked_mean(diff, has_smpl, jnp.sum(has_smpl > 0))


def edge_length_self_loss(pred, edges, has_smpl):
  """FastMETRO `EdgeLengthSelfLoss`: mean predicted edge length."""
  return masked_mean(_edge_lengths(pred, edges), has_smpl, jnp.sum(has_smpl > 0))


def edge_triangles(edges, num_vertices):
  """All triangles (3-cliques) of an edge graph, sorted, as int32 [T, 3].

  FastMETRO's `smpl_1723_faces.npy` (3451 faces) is exactly this set for the
  1723-vertex SMPL level; GraphCMR's F[1] lacks 9 of them (3442 faces). The
  normal loss is invariant to the vertex order inside a face.
  """
  edges = np.sort(np.asarray(edges), 1)
  adjacency = np.zeros((num_vertices, num_vertices), bool)
  adjacency[edges[:, 0], edges[:, 1]] = adjacency[edges[:, 1], edges[:, 0]] = True
  common = adjacency[edges[:, 0]] & adjacency[edges[:, 1]]  # [E, V]
  common &= np.arange(num_vertices)[None] > edges[:, 1:]  # c > b > a
  e, c = np.nonzero(common)
  return np.concatenate([edges[e], c[:, None]], 1).astype(np.int32)


def normal_vector_loss(pred, gt, faces, has_smpl):
  """Pose2Mesh/FastMETRO `NormalVectorLoss`: mean |cos(pred face edge, GT normal)|."""

  def edge(v, i, j):
    return _normalize(v[:, faces[:, j]] - v[:, faces[:, i]])  # [B, F, 3]

  normal_gt = _normalize(jnp.cross(edge(gt, 0, 1), edge(gt, 0, 2)))
  cos = [jnp.abs(jnp.sum(edge(pred, i, j) * normal_gt, -1)) for i, j in ((0, 1), (0, 2), (1, 2))]
  cos = jnp.stack(cos, -1)  # [B, F, 3]
  return masked_mean(cos, has_smpl, jnp.sum(has_smpl > 0))


# ----------------------------------------------------------------------------
# Centring of predictions and targets (shared with metrics.py).


def ground_truth(batch, gt_vertices_fine, regress_h36m, topology):
  """Training/eval targets from a batch and the body model's GT mesh.

  Args:
    batch: the batch dict (`data_pipelines/__init__.py`); uses joints_2d,
      joints_3d.
    gt_vertices_fine: [B, 6890, 3] SMPL(pose, betas), no translation.
    regress_h36m: vertices [B, 6890, 3] -> H36M joints [B, 17, 3].
    topology: MeshTopology; levels 1, 2 are selections of level 0.
  Returns:
    dict: vertices_{fine,intermediate,coarse} centred at the GT mesh's H36M
    pelvis; joints_3d [B, 14, 4] (xyz minus the J24 pelvis, conf); joints_2d
    [B, 14, 3].
  """
  gt_vertices_fine = jnp.asarray(gt_vertices_fine, _F32)
  pelvis = regress_h36m(gt_vertices_fine)[:, joint_tables.H36M_PELVIS]  # [B, 3]
  fine = gt_vertices_fine - pelvis[:, None]
  j24 = jnp.asarray(batch['joints_3d'], _F32)  # [B, 24, 4]
  j14 = j24[:, joint_tables.J24_TO_J14]
  j14 = jnp.concatenate(
      [j14[..., :3] - j24[:, None, joint_tables.J24_PELVIS, :3], j14[..., 3:]], -1
  )
  return {
      'vertices_fine': fine,
      'vertices_intermediate': topology.downsample(fine, 0, 1),
      'vertices_coarse': topology.downsample(fine, 0, 2),
      'joints_3d': j14,
      'joints_2d': jnp.asarray(batch['joints_2d'], _F32)[:, joint_tables.J24_TO_J14],
  }


def centre_predictions(outputs, regress_h36m):
  """FastMETRO's prediction normalisation (all float32).

  Returns dict: vertices_{fine,intermediate,coarse} minus the pelvis of the H36M
  joints regressed from the fine mesh; mesh_joints [B, 14, 3] (those joints in
  J14 order, same centre); token_joints [B, 14, 3] centred at their hip
  midpoint; cam [B, 3].
  """
  out = {k: jnp.asarray(v, _F32) for k, v in outputs.items()}
  j17 = regress_h36m(out['pred_3d_vertices_fine'])  # [B, 17, 3]
  pelvis = j17[:, joint_tables.H36M_PELVIS][:, None]  # [B, 1, 3]
  token = out['pred_3d_joints']
  return {
      'vertices_fine': out['pred_3d_vertices_fine'] - pelvis,
      'vertices_intermediate': out['pred_3d_vertices_intermediate'] - pelvis,
      'vertices_coarse': out['pred_3d_vertices_coarse'] - pelvis,
      'mesh_joints': j17[:, joint_tables.H36M_J17_TO_J14] - pelvis,
      'token_joints': token - hip_centre(token)[:, None],
      'cam': out['pred_cam'],
  }


# ----------------------------------------------------------------------------
# Total loss.


def zero_missing_labels(gt, has_3d, has_smpl, levels):
  """`gt` with 'joints_3d' zeroed where has_3d [B] is 0 and 'vertices_<level>' where has_smpl is.

  Labels of examples without them may hold anything (even NaN); zeroing them
  keeps 0 * NaN out of the loss value and its gradient.
  """
  gt = dict(gt)
  gt['joints_3d'] = jnp.where(has_3d[:, None, None] > 0, gt['joints_3d'], 0.0)
  for level in levels:
    key = f'vertices_{level}'
    gt[key] = jnp.where(has_smpl[:, None, None] > 0, gt[key], 0.0)
  return gt


def compute_loss(outputs, batch, gt_vertices_fine, regress_h36m, topology, loss_config):
  """The weighted total loss and its unweighted terms.

  Args:
    outputs: model output dict (`models.fastmetro.mesh_outputs`), any float
      dtype.
    batch: batch dict (`data_pipelines/__init__.py`).
    gt_vertices_fine: [B, 6890, 3] body model mesh of (pose, betas).
    regress_h36m: vertices [B, V, 3] -> [B, 17, 3] (H36M regressor).
    topology: MeshTopology (down-sampling; edges/faces of level 1).
    loss_config: `config.loss` (weights, see configs/r50.py).
  Returns:
    (total, terms): scalar float32 and a dict of named scalar terms.
  """
  c = loss_config
  pred = centre_predictions(outputs, regress_h36m)
  gt = ground_truth(batch, gt_vertices_fine, regress_h36m, topology)
  flag = lambda key: jnp.asarray(batch[key], _F32)  # [B]
  mask = flag('mask')
  has_3d = flag('has_3d_joints') * mask
  has_smpl = flag('has_smpl') * mask
  mask_2d = mask * (flag('has_2d_joints') if c.use_has_2d_joints else 1.0)

  gt = zero_missing_labels(gt, has_3d, has_smpl, ('coarse', 'intermediate', 'fine'))

  terms = {}
  terms['joints_3d_token'] = keypoint_3d_loss(pred['token_joints'], gt['joints_3d'], has_3d)
  terms['joints_3d_mesh'] = keypoint_3d_loss(pred['mesh_joints'], gt['joints_3d'], has_3d)
  terms['joints_3d'] = terms['joints_3d_token'] + terms['joints_3d_mesh']
  if c.joints_3d_pa:
    terms['joints_3d_pa'] = procrustes_keypoint_3d_loss(
        pred['mesh_joints'], gt['joints_3d'], has_3d
    )
  for level in ('coarse', 'intermediate', 'fine'):
    terms[f'vertices_{level}'] = vertices_loss(
        pred[f'vertices_{level}'], gt[f'vertices_{level}'], has_smpl
    )
  terms['vertices'] = (
      c.vertices_coarse * terms['vertices_coarse']
      + c.vertices_intermediate * terms['vertices_intermediate']
      + c.vertices_fine * terms['vertices_fine']
  )
  # beta: visibility (times has_2d_joints if asked) gates the numerator; every
  # real example counts in the denominator (FastMETRO: mean over B * 14 * 2).
  gt_2d = gt['joints_2d'].at[..., 2].multiply(mask_2d[:, None])  # [B, 14, 3]
  gt_2d = jnp.where(gt_2d[..., 2:] > 0, gt_2d, 0.0)
  terms['joints_2d_token'] = keypoint_2d_loss(
      orthographic_projection(pred['token_joints'], pred['cam']), gt_2d, mask
  )
  terms['joints_2d_mesh'] = keypoint_2d_loss(
      orthographic_projection(pred['mesh_joints'], pred['cam']), gt_2d, mask
  )
  terms['joints_2d'] = terms['joints_2d_token'] + terms['joints_2d_mesh']

  total = (
      c.joints_3d * terms['joints_3d']
      + c.vertices * terms['vertices']
      + c.joints_2d * terms['joints_2d']
  )
  if 'joints_3d_pa' in terms:
    total = total + c.joints_3d_pa * terms['joints_3d_pa']
  if c.use_edge_normal:
    edges = topology.edges[1]
    faces = edge_triangles(edges, topology.num_vertices[1])
    p, g = pred['vertices_intermediate'], gt['vertices_intermediate']
    terms['edge_gt'] = edge_length_gt_loss(p, g, edges, has_smpl)
    terms['edge_self'] = edge_length_self_loss(p, edges, has_smpl)
    terms['normal'] = normal_vector_loss(p, g, faces, has_smpl)
    terms['edge_normal'] = (
        c.edge_gt * terms['edge_gt'] + c.edge_self * terms['edge_self'] + c.normal * terms['normal']
    )
    total = total + c.edge_normal * terms['edge_normal']
  return total, terms
