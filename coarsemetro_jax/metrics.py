"""Evaluation metrics: MPJPE, PA-MPJPE, MPVE in mm (FastMETRO's `run_validate`).

Per example, as in FastMETRO's evaluation:
* predicted J14 = `J17[H36M_J17_TO_J14]` of the H36M joints regressed from the
  predicted fine mesh, and the mesh, both centred at that J17 pelvis (the same
  centring as the losses, `losses.centre_predictions`);
* GT J14 = `joints_3d[J24_TO_J14]` minus the J24 pelvis; GT mesh = body model
  of (pose, betas) centred at its own H36M pelvis (`losses.ground_truth`);
* MPJPE: both re-centred at the hip midpoint, mean Euclidean joint distance;
* PA-MPJPE: similarity Procrustes of pred onto GT (SVD, reflection fixed with
  sign(det), scale, translation), then the mean joint distance;
* MPVE: mean Euclidean vertex distance over the 6890 vertices.

Aggregation: MPJPE and PA-MPJPE average over examples with has_3d_joints, MPVE
over has_smpl, and eval padding (`mask` = 0) is excluded from all three. Each
real example counts exactly once, so the result is the dataset mean. (FastMETRO
averaged PA-MPJPE over all samples of a batch with weight sum(has_3d_joints),
and DDP-averaged per-rank means unweighted over a padded sampler; both agree
with this when every example has 3D joints, as in H36M P2 and 3DPW.)
A subset that stays empty over the whole evaluation reports 0 (FastMETRO prints
MPVPE 0.00 on H36M, whose labels have no SMPL); its count is 0.
"""

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import losses

MM_PER_M = 1000.0


def similarity_procrustes(source, target):
  """source aligned to target by `losses.similarity_transform`. [B,N,3] x2 -> [B,N,3]."""
  sr, t = losses.similarity_transform(source, target)
  return jnp.einsum('bij,bnj->bni', sr, source - source.mean(1, keepdims=True)) + t


def _mean_distance(a, b):
  return jnp.sqrt(jnp.sum((a - b) ** 2, -1)).mean(-1)  # [B]


def mpjpe(pred, gt):
  """Per-example MPJPE in metres after hip-midpoint centring. [B,14,3] x2 -> [B]."""
  return _mean_distance(
      pred - losses.hip_centre(pred)[:, None], gt - losses.hip_centre(gt)[:, None]
  )


def pa_mpjpe(pred, gt):
  """Per-example Procrustes-aligned MPJPE in metres. [B,N,3] x2 -> [B]."""
  return _mean_distance(similarity_procrustes(pred, gt), gt)


def mpve(pred, gt):
  """Per-example mean vertex error in metres. [B,V,3] x2 -> [B]."""
  return _mean_distance(pred, gt)


def pa_mpvpe(pred, gt):
  """Per-example Procrustes-aligned mean vertex error in metres. [B,V,3] x2 -> [B]."""
  return pa_mpjpe(pred, gt)


def f_score(pred, gt, threshold):
  """Per-example F-score of two point sets at `threshold` metres. [B,N,3], [B,M,3] -> [B].

  FreiHAND's definition: precision is the fraction of GT points whose nearest
  prediction is closer than the threshold (strictly), recall the fraction of
  predicted points whose nearest GT point is; F = 2PR / (P + R), and 0 where
  P + R = 0. FreiHAND scores Procrustes-aligned vertices (pass
  `similarity_procrustes(pred, gt)`) at 5 mm and 15 mm.
  """
  d = jnp.sqrt(jnp.sum((gt[:, :, None] - pred[:, None]) ** 2, -1))  # [B, M, N]
  precision = (d.min(2) < threshold).mean(1)  # GT -> nearest prediction
  recall = (d.min(1) < threshold).mean(1)  # prediction -> nearest GT
  total = precision + recall
  return jnp.where(total > 0, 2 * precision * recall / jnp.where(total > 0, total, 1), 0.0)


def errors_from_arrays(
    pred_joints, gt_joints, pred_vertices, gt_vertices, has_3d_joints, has_smpl, mask
):
  """Per-example errors in mm and their masks, ready for `EvalMetrics`.

  Takes already centred arrays (any predictor, e.g. a mean-pose baseline):
  pred_joints, gt_joints [B, 14, 3]; pred_vertices, gt_vertices [B, V, 3];
  has_3d_joints, has_smpl, mask [B].
  """
  real = mask > 0
  return {
      'mpjpe': MM_PER_M * mpjpe(pred_joints, gt_joints),
      'pa_mpjpe': MM_PER_M * pa_mpjpe(pred_joints, gt_joints),
      'mpve': MM_PER_M * mpve(pred_vertices, gt_vertices),
      'joints_mask': real & (has_3d_joints > 0),
      'vertices_mask': real & (has_smpl > 0),
  }


def _best_rotation(src, dst):
  """[N, 3, 3] rotations R minimising |src @ R - dst| (Kabsch; src [N, J, 3], dst [J, 3])."""
  u, _, vt = np.linalg.svd(np.einsum('nja,jb->nab', src, dst))
  u[:, :, -1] *= np.sign(np.linalg.det(u @ vt))[:, None]  # no reflections
  return u @ vt


def procrustes_mean(poses, iterations=5):
  """The mean body pose [J, 3] of root-free J14 poses [N, J, 3] (NumPy).

  A plain average of camera-frame poses seen from many directions collapses
  towards a point (a "baseline" no model could lose to). Each pose is instead
  rotated onto the running mean before averaging (generalised Procrustes,
  rotation only), and the result is given the orientation that best fits the
  plain average and is centred at the hip midpoint (where MPJPE centres poses).
  """
  poses = np.asarray(poses, np.float64)
  centred = poses - poses.mean(1, keepdims=True)  # [N, J, 3]
  mean = centred[0]
  for _ in range(iterations):
    rot = _best_rotation(centred, mean)  # [N, 3, 3]
    mean = np.einsum('nja,nab->jb', centred, rot) / len(centred)
  mean = mean @ _best_rotation(mean[None], centred.mean(0))[0]
  hips = 0.5 * (mean[joint_tables.J14_R_HIP] + mean[joint_tables.J14_L_HIP])
  return mean - hips


def mean_pose_baseline(train_joints, test_joints):
  """MPJPE / PA-MPJPE (mm) of always predicting the training set's mean pose.

  Args:
    train_joints, test_joints: [N, 14, 3] root-relative J14 joints of the
      examples with 3D joints (`data_pipelines.datasets.j14_joints`).
  Returns:
    {'mpjpe', 'pa_mpjpe': mm, 'count': test examples}.
  """
  test = np.asarray(test_joints, np.float32)
  pred = np.broadcast_to(procrustes_mean(train_joints), test.shape).astype(np.float32)
  mm = lambda fn: MM_PER_M * float(np.asarray(fn(pred, test)).mean())
  return {'mpjpe': mm(mpjpe), 'pa_mpjpe': mm(pa_mpjpe), 'count': int(len(test))}


def hand_mean_pose_baseline(train, test, iterations=5, chunk=32):
  """FreiHAND's metrics of always predicting the training set's mean hand.

  The mean hand is the generalised Procrustes mean (rotations only, as
  `procrustes_mean`) of the training hands, each its 21 joints and its
  vertices together, after mirroring the left hands (x -> -x) into right
  ones; a left test hand is predicted by the mirrored mean. A similarity
  alignment cannot turn a right hand into a left one, so without this a
  baseline would lose by chirality alone, which a model reads off the image.

  Args:
    train, test: (joints [N, 21, 3], vertices [N, V, 3], is_left [N]) in
      metres, any centring (`data_pipelines.datasets.hand_targets`).
    iterations: Procrustes iterations.
    chunk: test examples per F-score call (its distance matrix is [chunk, V, V]).

  Returns:
    {'pa_mpjpe', 'pa_mpvpe': mm, 'f5', 'f15': mean F-scores at 5 and 15 mm of
    the Procrustes-aligned vertices, 'count': test examples}.
  """
  flip_x = lambda points, left: np.where(
      np.asarray(left, bool)[:, None, None], points * np.array([-1.0, 1.0, 1.0]), points
  )
  joints, verts, left = train
  if not len(joints) or not len(test[0]):
    raise ValueError('hand_mean_pose_baseline needs training and test hands')
  num_joints = np.shape(joints)[1]
  hands = flip_x(np.concatenate([joints, verts], 1).astype(np.float64), left)  # [N, J + V, 3]
  centred = hands - hands.mean(1, keepdims=True)
  mean = centred[0]
  for _ in range(iterations):
    mean = np.einsum('nja,nab->jb', centred, _best_rotation(centred, mean)) / len(centred)
  mean = mean - mean[0]  # at the wrist (joint 0)
  test_joints, test_verts, test_left = (np.asarray(x) for x in test)
  pred = flip_x(np.broadcast_to(mean, (len(test_joints),) + mean.shape), test_left)
  pred = pred.astype(np.float32)
  pred_joints, pred_verts = pred[:, :num_joints], pred[:, num_joints:]
  gt_joints, gt_verts = test_joints.astype(np.float32), test_verts.astype(np.float32)

  @jax.jit
  def errors(pred_joints, gt_joints, pred_verts, gt_verts):  # [C, ...] -> [4, C]
    aligned = similarity_procrustes(pred_verts, gt_verts)
    return jnp.stack(
        [
            pa_mpjpe(pred_joints, gt_joints),
            _mean_distance(aligned, gt_verts),
            f_score(aligned, gt_verts, 0.005),
            f_score(aligned, gt_verts, 0.015),
        ]
    )

  count = len(gt_joints)
  sums = np.zeros(4)
  for s in range(0, count, chunk):
    # The last chunk is padded (with its last example) to one compiled shape.
    part = np.minimum(np.arange(s, s + chunk), count - 1)
    e = np.asarray(errors(pred_joints[part], gt_joints[part], pred_verts[part], gt_verts[part]))
    sums += e[:, : count - s].sum(1)
  pa_mpjpe_m, pa_mpvpe_m, f5, f15 = (float(x) for x in sums / count)
  return {
      'pa_mpjpe': MM_PER_M * pa_mpjpe_m,
      'pa_mpvpe': MM_PER_M * pa_mpvpe_m,
      'f5': f5,
      'f15': f15,
      'count': int(count),
  }


@flax.struct.dataclass
class MaskedAverage(clu_metrics.Average):
  """clu Average that reports 0 (not NaN) when nothing was accumulated."""

  def compute(self):
    return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1), 0.0)


def _average(value_key, mask_key):
  return MaskedAverage.from_fun(lambda **out: {'values': out[value_key], 'mask': out[mask_key]})


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """mm metrics accumulated over padded eval batches (merge, then compute)."""

  mpjpe: _average('mpjpe', 'joints_mask')
  pa_mpjpe: _average('pa_mpjpe', 'joints_mask')
  mpve: _average('mpve', 'vertices_mask')


def eval_metrics(errors):
  """Collection of one batch from the dict of `errors_from_arrays`; jit-safe."""
  return EvalMetrics.single_from_model_output(**errors)


# ----------------------------------------------------------------------------
# Hands: FreiHAND's protocol (METRO / FastMETRO report it for FreiHAND).
#
# Per example: predicted 21 joints = those regressed from the predicted 778
# mesh (hand_losses.regress_joints), joints and mesh centred at that wrist; GT
# joints = joints_3d minus joint 0, GT mesh = the hand model's of (pose, betas)
# centred at its wrist (hand_losses.ground_truth). PA-MPJPE: joints aligned to
# the GT by a similarity Procrustes; PA-MPVPE: the vertices aligned on their
# own the same way; F@5 mm and F@15 mm (`f_score`) of the aligned vertices.
# Averages: PA-MPJPE over has_3d_joints, the vertex metrics over has_smpl (has
# MANO), eval padding excluded; F-scores are averaged per example, as
# FreiHAND's evaluation does.

F_SCORE_THRESHOLDS_MM = (5.0, 15.0)


def hand_errors_from_arrays(
    pred_joints, gt_joints, pred_vertices, gt_vertices, has_3d_joints, has_smpl, mask
):
  """Per-example hand metrics and their masks, ready for `HandEvalMetrics`.

  pred_joints, gt_joints [B, 21, 3]; pred_vertices, gt_vertices [B, V, 3]
  (metres, centred); has_3d_joints, has_smpl, mask [B]. Returns pa_mpjpe,
  pa_mpvpe (mm), f5, f15 (fractions in [0, 1]) and the two masks.
  """
  aligned = similarity_procrustes(pred_vertices, gt_vertices)  # [B, V, 3]
  real = mask > 0
  errors = {
      'pa_mpjpe': MM_PER_M * pa_mpjpe(pred_joints, gt_joints),
      'pa_mpvpe': MM_PER_M * _mean_distance(aligned, gt_vertices),
      'joints_mask': real & (has_3d_joints > 0),
      'vertices_mask': real & (has_smpl > 0),
  }
  for mm in F_SCORE_THRESHOLDS_MM:
    errors[f'f{mm:g}'] = f_score(aligned, gt_vertices, mm / MM_PER_M)
  return errors


@flax.struct.dataclass
class HandEvalMetrics(clu_metrics.Collection):
  """Hand metrics accumulated over padded eval batches (merge, then compute)."""

  pa_mpjpe: _average('pa_mpjpe', 'joints_mask')
  pa_mpvpe: _average('pa_mpvpe', 'vertices_mask')
  f5: _average('f5', 'vertices_mask')
  f15: _average('f15', 'vertices_mask')


# The metrics whose example counts an evaluation reports ('<name>_count').
HAND_COUNTED = ('pa_mpjpe', 'pa_mpvpe')


def hand_eval_metrics(errors):
  """HandEvalMetrics of one batch from `hand_errors_from_arrays`; jit-safe."""
  return HandEvalMetrics.single_from_model_output(**errors)


def hand_metrics_table(results, baseline=None):
  """Markdown table of hand eval metrics, with a mean-pose baseline row if given.

  results: [(name, metrics dict of an evaluation)]; baseline: a dict with some
  of pa_mpjpe, pa_mpvpe (mm), f5, f15 and count ('-' for a missing one).
  """
  lines = [
      '| model | PA-MPJPE (mm) | PA-MPVPE (mm) | F@5 mm | F@15 mm | examples |',
      '|---|---|---|---|---|---|',
  ]

  def row(name, r, count):
    cell = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else '-'
    return (
        f"| {name} | {cell('pa_mpjpe', '.1f')} | {cell('pa_mpvpe', '.1f')} | "
        f"{cell('f5', '.3f')} | {cell('f15', '.3f')} | {count} |"
    )

  lines += [row(name, r, r['pa_mpvpe_count']) for name, r in results]
  if baseline is not None:
    lines.append(row('mean-pose baseline', baseline, baseline.get('count', '-')))
  return '\n'.join(lines)
