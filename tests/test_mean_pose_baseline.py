"""The mean-pose baseline of the synthetic run's metrics table (metrics.procrustes_mean)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coarsemetro_jax import joints
from coarsemetro_jax import metrics


def _poses(num, seed, base_seed=0):
  """A random 14-joint pose and `num` noisy copies of it."""
  base = np.random.default_rng(base_seed).normal(size=(14, 3)) * 0.3
  return base, base + np.random.default_rng(seed).normal(size=(num, 14, 3)) * 0.02


def test_mean_of_rotated_copies_is_the_pose():
  base, _ = _poses(1, 1)
  rots = Rotation.random(50, random_state=1).as_matrix()  # [N, 3, 3]
  seen = np.einsum('ja,nba->njb', base, rots)  # R @ base per copy
  mean = metrics.procrustes_mean(seen)
  # Same shape as the pose (a plain average would shrink towards a point) ...
  aligned = np.asarray(
      metrics.pa_mpjpe(mean[None].astype(np.float32), base[None].astype(np.float32))
  )
  assert float(aligned[0]) < 1e-5
  assert abs(np.linalg.norm(mean - mean.mean(0)) - np.linalg.norm(base - base.mean(0))) < 1e-6
  # ... centred at the hip midpoint.
  hips = 0.5 * (mean[joints.J14_R_HIP] + mean[joints.J14_L_HIP])
  np.testing.assert_allclose(hips, 0.0, atol=1e-12)


def test_baseline_does_not_depend_on_the_training_poses_orientation():
  _, poses = _poses(40, 2)
  test = _poses(10, 3)[1].astype(np.float32)
  rots = Rotation.random(len(poses), random_state=4).as_matrix()
  rotated = np.einsum('nja,nba->njb', poses, rots)
  pa = [
      float(
          np.mean(
              metrics.pa_mpjpe(
                  np.broadcast_to(metrics.procrustes_mean(p), test.shape).astype(np.float32), test
              )
          )
      )
      for p in (poses, rotated)
  ]
  np.testing.assert_allclose(pa[0], pa[1], rtol=1e-4)
  # The plain average of the rotated poses is a much worse predictor.
  plain = np.broadcast_to(rotated.mean(0), test.shape).astype(np.float32)
  assert float(np.mean(metrics.pa_mpjpe(plain, test))) > 2 * pa[1]


def test_baseline_of_a_hand_made_test_set():
  """Train poses: one pose, seen turned; test: that pose, and it with a foot moved."""
  base, _ = _poses(1, 1)
  base = base - 0.5 * (base[joints.J14_R_HIP] + base[joints.J14_L_HIP])
  rots = Rotation.random(20, random_state=5).as_matrix()
  train = np.einsum('ja,nba->njb', base, rots)
  moved = base.copy()
  moved[0] += [0.0, 0.07, 0.0]  # joint 0 (a foot): the hips do not move
  # The mean pose is the pose itself, turned: after Procrustes it scores 0.
  exact = metrics.mean_pose_baseline(train, base[None])
  assert exact['count'] == 1 and exact['pa_mpjpe'] < 1e-3
  result = metrics.mean_pose_baseline(train, np.stack([base, moved]))
  assert result['count'] == 2
  one = metrics.mean_pose_baseline(train, moved[None])
  assert result['pa_mpjpe'] == pytest.approx((exact['pa_mpjpe'] + one['pa_mpjpe']) / 2, rel=1e-5)
  assert one['pa_mpjpe'] > 1.0  # the moved foot is an error
  # Without alignment: hip-centred joint distances to the mean pose, in mm.
  mean = metrics.procrustes_mean(train)
  hip = lambda x: x - 0.5 * (x[..., 2:3, :] + x[..., 3:4, :])
  expected = np.linalg.norm(hip(mean) - hip(np.stack([base, moved])), axis=-1).mean()
  assert result['mpjpe'] == pytest.approx(1000 * expected, rel=1e-5)
