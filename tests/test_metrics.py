"""Metrics against hand-built transforms and a NumPy transcription of METRO's."""

import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import metrics


def np_similarity_transform(s1, s2):
  """METRO/FastMETRO `compute_similarity_transform` (one sample, [N, 3])."""
  s1, s2 = s1.T, s2.T
  mu1, mu2 = s1.mean(1, keepdims=True), s2.mean(1, keepdims=True)
  x1, x2 = s1 - mu1, s2 - mu2
  var1 = np.sum(x1**2)
  k = x1.dot(x2.T)
  u, _, vh = np.linalg.svd(k)
  v = vh.T
  z = np.eye(3)
  z[-1, -1] *= np.sign(np.linalg.det(u.dot(v.T)))
  r = v.dot(z.dot(u.T))
  scale = np.trace(r.dot(k)) / var1
  t = mu2 - scale * r.dot(mu1)
  return (scale * r.dot(s1) + t).T


def np_pa_mpjpe(pred, gt):
  return np.array(
      [np.sqrt(((np_similarity_transform(p, g) - g) ** 2).sum(-1)).mean() for p, g in zip(pred, gt)]
  )


def np_mpjpe(pred, gt):
  c = lambda x: x - (x[:, 2] + x[:, 3])[:, None] / 2
  return np.sqrt(((c(pred) - c(gt)) ** 2).sum(-1)).mean(-1)


def random_rotation(rng):
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q *= np.sign(np.diag(r))
  return q * np.sign(np.linalg.det(q))  # det +1


def test_procrustes_recovers_similarity_transform():
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(4, 14, 3)).astype(np.float32) * 0.3
  pred = np.stack(
      [
          s * g @ random_rotation(rng).T + rng.normal(size=3)
          for s, g in zip([0.5, 1.0, 2.0, 7.0], gt)
      ]
  ).astype(np.float32)
  aligned = metrics.similarity_procrustes(jnp.asarray(pred), jnp.asarray(gt))
  np.testing.assert_allclose(aligned, gt, atol=2e-5)
  np.testing.assert_allclose(metrics.pa_mpjpe(pred, gt), 0.0, atol=2e-5)
  # Plain MPJPE sees the transform.
  assert np.all(np.asarray(metrics.mpjpe(pred, gt)) > 0.05)


def test_procrustes_reflection_is_not_undone():
  rng = np.random.default_rng(1)
  gt = rng.normal(size=(3, 14, 3)).astype(np.float32)
  pred = gt * np.float32([-1, 1, 1])  # mirror image: no rotation fits
  pa = np.asarray(metrics.pa_mpjpe(pred, gt))
  np.testing.assert_allclose(pa, np_pa_mpjpe(pred, gt), rtol=1e-4, atol=1e-6)
  assert np.all(pa > 0.1)
  # A proper rotation of the mirror image, checked against the NumPy code.
  pred = pred @ random_rotation(rng).T + 0.2
  np.testing.assert_allclose(
      metrics.pa_mpjpe(pred, gt), np_pa_mpjpe(pred, gt), rtol=1e-4, atol=1e-6
  )


def test_errors_match_numpy_random():
  rng = np.random.default_rng(2)
  pred, gt = rng.normal(size=(2, 5, 14, 3)).astype(np.float32)
  np.testing.assert_allclose(metrics.pa_mpjpe(pred, gt), np_pa_mpjpe(pred, gt), rtol=1e-4)
  np.testing.assert_allclose(metrics.mpjpe(pred, gt), np_mpjpe(pred, gt), rtol=1e-5)
  pv, gv = rng.normal(size=(2, 5, 40, 3)).astype(np.float32)
  np.testing.assert_allclose(
      metrics.mpve(pv, gv), np.linalg.norm(pv - gv, axis=-1).mean(-1), rtol=1e-5
  )


def test_padded_accumulation_counts_each_example_once():
  rng = np.random.default_rng(3)
  n, batch = 11, 4  # 3 batches, the last padded by 1
  pj, gj = rng.normal(size=(2, n, 14, 3)).astype(np.float32)
  pv, gv = rng.normal(size=(2, n, 20, 3)).astype(np.float32)
  has_3d = np.float32(rng.integers(0, 2, n))
  has_3d[0] = 1
  has_smpl = np.float32(rng.integers(0, 2, n))
  has_smpl[0] = 1

  @jax.jit
  def step(pj, gj, pv, gv, h3, hs, mask):
    return metrics.eval_metrics(metrics.errors_from_arrays(pj, gj, pv, gv, h3, hs, mask))

  pad = lambda x: np.concatenate([x, np.repeat(x[:1], 12 - n, 0)])  # duplicate padding
  arrays = [pad(x) for x in (pj, gj, pv, gv, has_3d, has_smpl)]
  mask = np.float32([1] * n + [0] * (12 - n))
  total = None
  for i in range(0, 12, batch):
    update = step(*[x[i : i + batch] for x in arrays], mask[i : i + batch])
    total = update if total is None else total.merge(update)
  result = total.compute()
  sel3, sels = has_3d > 0, has_smpl > 0
  np.testing.assert_allclose(result['mpjpe'], 1000 * np_mpjpe(pj, gj)[sel3].mean(), rtol=1e-5)
  np.testing.assert_allclose(result['pa_mpjpe'], 1000 * np_pa_mpjpe(pj, gj)[sel3].mean(), rtol=1e-4)
  np.testing.assert_allclose(
      result['mpve'], 1000 * np.linalg.norm(pv - gv, axis=-1).mean(-1)[sels].mean(), rtol=1e-5
  )
  assert int(total.mpjpe.count) == sel3.sum()
  assert int(total.mpve.count) == sels.sum()


def test_empty_subset_reports_zero_not_nan():
  z = jnp.zeros((2, 14, 3))  # degenerate: Procrustes var = 0
  v = jnp.ones((2, 5, 3))
  errors = metrics.errors_from_arrays(z, z + jnp.nan, v, v, jnp.zeros(2), jnp.zeros(2), jnp.ones(2))
  result = metrics.eval_metrics(errors).compute()
  for k, value in result.items():
    assert float(value) == 0.0, k
  # The degenerate Procrustes case itself stays finite.
  assert np.all(np.isfinite(metrics.pa_mpjpe(z, jnp.ones((2, 14, 3)))))


def test_f_score_hand_computed():
  # GT: 4 points on a line 10 mm apart; predictions: 2 exact, 1 off by 4 mm,
  # 1 far from everything.
  gt = np.array([[[0.0, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0.03, 0, 0]]])
  pred = np.array([[[0.0, 0, 0], [0.01, 0, 0], [0.02, 0.004, 0], [0.5, 0, 0]]])
  # GT -> nearest prediction: 0, 0, 4 mm, 10 mm (0.03 -> 0.02,0.004: sqrt(100+16)=10.8 mm).
  # Prediction -> nearest GT: 0, 0, 4 mm, 470 mm.
  # At 5 mm: precision 3/4, recall 3/4 -> F = 0.75.
  np.testing.assert_allclose(metrics.f_score(pred, gt, 0.005), [0.75], atol=1e-6)
  # At 15 mm: precision 4/4, recall 3/4 -> F = 2 * 1 * 0.75 / 1.75 = 6/7.
  np.testing.assert_allclose(metrics.f_score(pred, gt, 0.015), [6 / 7], atol=1e-6)
  # Strictly closer than the threshold: a point exactly 4 mm away is not within 4 mm.
  np.testing.assert_allclose(metrics.f_score(pred, gt, 0.004), [0.5], atol=1e-6)
  # Nothing within the threshold: 0, not NaN.
  np.testing.assert_allclose(metrics.f_score(pred + 1.0, gt, 0.005), [0.0])


def test_f_score_of_unequal_sizes_and_batch():
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(3, 50, 3)) * 0.05
  pred = rng.normal(size=(3, 40, 3)) * 0.05
  got = np.asarray(metrics.f_score(pred, gt, 0.01))
  for b in range(3):
    d = np.linalg.norm(gt[b][:, None] - pred[b][None], axis=-1)
    p, r = (d.min(1) < 0.01).mean(), (d.min(0) < 0.01).mean()
    np.testing.assert_allclose(got[b], 0 if p + r == 0 else 2 * p * r / (p + r), atol=1e-6)
  np.testing.assert_allclose(metrics.f_score(gt, gt, 1e-6), np.ones(3))
