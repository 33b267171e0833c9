"""Losses against NumPy transcriptions of FastMETRO's PyTorch loss code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import losses
from coarsemetro_jax import mesh_topology
from configs import r50

B = 6


def tiny_topology():
  """Icosahedron (12) -> octahedron-like level (6) -> triangle (3)."""
  faces0 = np.array(
      [
          [0, 11, 5],
          [0, 5, 1],
          [0, 1, 7],
          [0, 7, 10],
          [0, 10, 11],
          [1, 5, 9],
          [5, 11, 4],
          [11, 10, 2],
          [10, 7, 6],
          [7, 1, 8],
          [3, 9, 4],
          [3, 4, 2],
          [3, 2, 6],
          [3, 6, 8],
          [3, 8, 9],
          [4, 9, 5],
          [2, 4, 11],
          [6, 2, 10],
          [8, 6, 7],
          [9, 8, 1],
      ]
  )
  faces1 = np.array(
      [[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1], [5, 2, 1], [5, 3, 2], [5, 4, 3], [5, 1, 4]]
  )
  faces2 = np.array([[0, 1, 2]])

  def edges(f):
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.unique(np.sort(e, 1), axis=0)
    return e.astype(np.int32)

  return mesh_topology.MeshTopology(
      num_vertices=(12, 6, 3),
      faces=tuple(np.int32(f) for f in (faces0, faces1, faces2)),
      edges=tuple(edges(f) for f in (faces0, faces1, faces2)),
      down_indices=(np.int32([0, 2, 4, 6, 8, 10]), np.int32([1, 3, 5])),
      up_indices=(np.zeros((12, 3), np.int32), np.zeros((6, 3), np.int32)),
      up_weights=(np.zeros((12, 3), np.float32), np.zeros((6, 3), np.float32)),
      coarse_adjacency=np.ones((3, 3), bool),
  )


def make_case(rng, has_3d=None, has_smpl=None):
  v = 12
  regressor = rng.uniform(0, 1, (17, v))
  regressor /= regressor.sum(1, keepdims=True)
  outputs = {
      'pred_cam': rng.normal(size=(B, 3)).astype(np.float32),
      'pred_3d_joints': rng.normal(size=(B, 14, 3)).astype(np.float32),
      'pred_3d_vertices_coarse': rng.normal(size=(B, 3, 3)).astype(np.float32),
      'pred_3d_vertices_intermediate': rng.normal(size=(B, 6, 3)).astype(np.float32),
      'pred_3d_vertices_fine': rng.normal(size=(B, v, 3)).astype(np.float32),
  }
  joints_2d = rng.uniform(-1, 1, (B, 24, 3)).astype(np.float32)
  joints_2d[..., 2] = rng.integers(0, 2, (B, 24))
  joints_3d = rng.normal(size=(B, 24, 4)).astype(np.float32)
  joints_3d[..., 3] = rng.uniform(0, 1, (B, 24))
  batch = {
      'joints_2d': joints_2d,
      'joints_3d': joints_3d,
      'has_2d_joints': np.float32(rng.integers(0, 2, B)),
      'has_3d_joints': np.float32([1, 0, 1, 1, 0, 1] if has_3d is None else has_3d),
      'has_smpl': np.float32([0, 1, 1, 0, 1, 1] if has_smpl is None else has_smpl),
      'mask': np.ones(B, np.float32),
  }
  gt_vertices = rng.normal(size=(B, v, 3)).astype(np.float32)
  return outputs, batch, gt_vertices, regressor.astype(np.float32)


def regress_fn(regressor):
  return lambda vertices: jnp.einsum('jv,bvc->bjc', regressor, vertices)


# ---------------------------------------------------------------------------
# NumPy transcription of FastMETRO's run_train (boolean indexing, torch means).


def np_kp3d(pred, gt, has):
  conf = gt[:, :, -1:]
  gt, conf, pred = gt[has == 1][:, :, :-1], conf[has == 1], pred[has == 1]
  if not len(gt):
    return 0.0
  gt = gt - (gt[:, 2] + gt[:, 3])[:, None] / 2
  pred = pred - (pred[:, 2] + pred[:, 3])[:, None] / 2
  return float((conf * np.abs(pred - gt)).mean())


def np_kp2d(pred, gt):
  return float((gt[:, :, -1:] * np.abs(pred - gt[:, :, :-1])).mean())


def np_vert(pred, gt, has):
  pred, gt = pred[has == 1], gt[has == 1]
  return float(np.abs(pred - gt).mean()) if len(gt) else 0.0


def np_proj(x, cam):
  return cam[:, None, :1] * (x[:, :, :2] + cam[:, None, 1:])


def np_edge_gt(pred, gt, edges, has):
  pred, gt = pred[has == 1], gt[has == 1]
  if not len(gt):
    return 0.0
  d = lambda c: np.sqrt(((c[:, edges[:, 0]] - c[:, edges[:, 1]]) ** 2).sum(2) + 1e-8)
  return float(np.abs(d(pred) - d(gt)).mean())


def np_edge_self(pred, edges, has):
  pred = pred[has == 1]
  if not len(pred):
    return 0.0
  return float(np.sqrt(((pred[:, edges[:, 0]] - pred[:, edges[:, 1]]) ** 2).sum(2) + 1e-8).mean())


def np_normal(pred, gt, faces, has):
  pred, gt = pred[has == 1], gt[has == 1]
  if not len(gt):
    return 0.0
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
  e = lambda c, i, j: unit(c[:, faces[:, j]] - c[:, faces[:, i]])
  n = unit(np.cross(e(gt, 0, 1), e(gt, 0, 2)))
  cos = [np.abs((e(pred, i, j) * n).sum(2)) for i, j in ((0, 1), (0, 2), (1, 2))]
  return float(np.concatenate(cos, 1).mean())


def np_total(outputs, batch, gt_fine, regressor, topology, c):
  """FastMETRO's `run_train` loss block, literally."""
  j17 = np.einsum('jv,bvc->bjc', regressor, outputs['pred_3d_vertices_fine'])
  pelvis = j17[:, 0][:, None]
  mesh_j = j17[:, list(joint_tables.H36M_J17_TO_J14)] - pelvis
  tok = outputs['pred_3d_joints']
  tok = tok - (tok[:, 2] + tok[:, 3])[:, None] / 2
  pv = {k: outputs[f'pred_3d_vertices_{k}'] - pelvis for k in ('coarse', 'intermediate', 'fine')}
  gt_pelvis = np.einsum('jv,bvc->bjc', regressor, gt_fine)[:, 0][:, None]
  gv = {'fine': gt_fine - gt_pelvis}
  gv['intermediate'] = gv['fine'][:, topology.down_indices[0]]
  gv['coarse'] = gv['intermediate'][:, topology.down_indices[1]]
  j3d = batch['joints_3d'].copy()
  gt3 = j3d[:, list(joint_tables.J24_TO_J14)]
  gt3[:, :, :3] -= j3d[:, 14, :3][:, None]
  gt2 = batch['joints_2d'][:, list(joint_tables.J24_TO_J14)]
  h3, hs = batch['has_3d_joints'], batch['has_smpl']
  l3 = np_kp3d(tok, gt3, h3) + np_kp3d(mesh_j, gt3, h3)
  lv = (
      c.vertices_coarse * np_vert(pv['coarse'], gv['coarse'], hs)
      + c.vertices_intermediate * np_vert(pv['intermediate'], gv['intermediate'], hs)
      + c.vertices_fine * np_vert(pv['fine'], gv['fine'], hs)
  )
  cam = outputs['pred_cam']
  l2 = np_kp2d(np_proj(tok, cam), gt2) + np_kp2d(np_proj(mesh_j, cam), gt2)
  total = c.joints_3d * l3 + c.vertices * lv + c.joints_2d * l2
  if c.use_edge_normal:
    p, g = pv['intermediate'], gv['intermediate']
    e, f = topology.edges[1], losses.edge_triangles(topology.edges[1], 6)
    total += c.edge_normal * (
        c.edge_gt * np_edge_gt(p, g, e, hs)
        + c.edge_self * np_edge_self(p, e, hs)
        + c.normal * np_normal(p, g, f, hs)
    )
  return total, {'joints_3d': l3, 'vertices': lv, 'joints_2d': l2}


# ---------------------------------------------------------------------------


def test_orthographic_projection_hand_case():
  x = jnp.array([[[1.0, -2.0, 5.0]]])
  cam = jnp.array([[2.0, 0.5, 0.25]])
  np.testing.assert_allclose(losses.orthographic_projection(x, cam), [[[3.0, -3.5]]])


def test_terms_match_numpy():
  rng = np.random.default_rng(0)
  topology = tiny_topology()
  pred, gt = rng.normal(size=(2, B, 14, 4)).astype(np.float32)
  has = np.float32([1, 0, 1, 1, 0, 0])
  np.testing.assert_allclose(
      losses.keypoint_3d_loss(pred[..., :3], gt, has), np_kp3d(pred[..., :3], gt, has), rtol=1e-5
  )
  gt2 = gt[..., :3].copy()
  gt2[..., 2] = rng.integers(0, 2, gt2.shape[:2])
  np.testing.assert_allclose(
      losses.keypoint_2d_loss(pred[..., :2], gt2, np.ones(B)),
      np_kp2d(pred[..., :2], gt2),
      rtol=1e-5,
  )
  pv, gv = rng.normal(size=(2, B, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.vertices_loss(pv, gv, has), np_vert(pv, gv, has), rtol=1e-5)
  e, f = topology.edges[1], topology.faces[1]
  np.testing.assert_allclose(
      losses.edge_length_gt_loss(pv, gv, e, has), np_edge_gt(pv, gv, e, has), rtol=1e-5
  )
  np.testing.assert_allclose(
      losses.edge_length_self_loss(pv, e, has), np_edge_self(pv, e, has), rtol=1e-5
  )
  # The octahedron's edge graph has exactly its 8 faces as triangles.
  as_set = lambda x: {tuple(sorted(t)) for t in np.asarray(x).tolist()}
  assert as_set(losses.edge_triangles(e, 6)) == as_set(f)
  np.testing.assert_allclose(
      losses.normal_vector_loss(pv, gv, f, has), np_normal(pv, gv, f, has), rtol=1e-5
  )


@pytest.mark.parametrize('use_edge_normal', [False, True])
def test_total_loss_matches_numpy(use_edge_normal):
  rng = np.random.default_rng(1)
  topology = tiny_topology()
  outputs, batch, gt_fine, regressor = make_case(rng)
  config = r50.get_config().loss
  config.use_edge_normal = use_edge_normal
  fn = jax.jit(
      lambda o, b, g: losses.compute_loss(o, b, g, regress_fn(regressor), topology, config)
  )
  total, terms = fn(outputs, batch, gt_fine)
  ref_total, ref_terms = np_total(outputs, batch, gt_fine, regressor, topology, config)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  for k, v in ref_terms.items():
    np.testing.assert_allclose(terms[k], v, rtol=1e-5, err_msg=k)
  assert ('edge_normal' in terms) == use_edge_normal


def test_empty_subsets_give_zero_and_finite_gradients():
  rng = np.random.default_rng(2)
  topology = tiny_topology()
  outputs, batch, gt_fine, regressor = make_case(rng, has_3d=[0] * B, has_smpl=[0] * B)
  batch['joints_2d'][..., 2] = 0.0
  batch['joints_2d'][..., :2] = np.nan
  # Garbage (NaN) labels of unlabelled examples must not leak into the loss.
  batch['joints_3d'][...] = np.nan
  gt_fine[...] = np.nan
  config = r50.get_config().loss
  config.use_edge_normal = True

  def loss_fn(o):
    return losses.compute_loss(o, batch, gt_fine, regress_fn(regressor), topology, config)

  (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(outputs)
  assert float(total) == 0.0
  for k, v in terms.items():
    assert float(v) == 0.0, k
  for g in jax.tree.leaves(grads):
    assert np.all(np.asarray(g) == 0.0)


def test_padding_and_has_2d_flag():
  rng = np.random.default_rng(3)
  topology = tiny_topology()
  outputs, batch, gt_fine, regressor = make_case(rng)
  config = r50.get_config().loss
  regress = regress_fn(regressor)
  # Padded examples drop out exactly: same loss as on the real examples alone.
  padded = {k: v.copy() for k, v in batch.items()}
  padded['mask'] = np.float32([1, 1, 1, 1, 0, 0])
  real = slice(0, 4)
  _, t_pad = losses.compute_loss(outputs, padded, gt_fine, regress, topology, config)
  _, t_real = losses.compute_loss(
      {k: v[real] for k, v in outputs.items()},
      {k: v[real] for k, v in batch.items()},
      gt_fine[real],
      regress,
      topology,
      config,
  )
  for k in t_real:
    np.testing.assert_allclose(t_pad[k], t_real[k], rtol=1e-5, err_msg=k)
  # use_has_2d_joints: has_2d_joints multiplies visibility.
  config.use_has_2d_joints = True
  _, t_flag = losses.compute_loss(outputs, batch, gt_fine, regress, topology, config)
  gated = {k: v.copy() for k, v in batch.items()}
  gated['joints_2d'][..., 2] *= batch['has_2d_joints'][:, None]
  config.use_has_2d_joints = False
  _, t_gated = losses.compute_loss(outputs, gated, gt_fine, regress, topology, config)
  np.testing.assert_allclose(t_flag['joints_2d'], t_gated['joints_2d'], rtol=1e-6)
  assert float(t_flag['joints_2d']) != float(t_real['joints_2d'])


def test_real_smpl_level1_edges_and_faces_match_fastmetro(smpl_topology_dir):
  """FastMETRO's edge/normal losses read smpl_1723_{edges,faces}.npy; we derive them."""
  topology = mesh_topology.load_topology(str(smpl_topology_dir / 'mesh_downsampling.npz'))
  edges = np.load(smpl_topology_dir / 'smpl_1723_edges.npy')
  faces = np.load(smpl_topology_dir / 'smpl_1723_faces.npy')
  as_set = lambda e: {tuple(sorted(x)) for x in np.asarray(e).tolist()}
  assert len(topology.edges[1]) == len(edges) == 5163
  assert as_set(topology.edges[1]) == as_set(edges)
  triangles = losses.edge_triangles(topology.edges[1], topology.num_vertices[1])
  assert len(triangles) == len(faces) == 3451
  assert as_set(triangles) == as_set(faces)


def test_bfloat16_outputs_are_scored_in_float32():
  rng = np.random.default_rng(4)
  topology = tiny_topology()
  outputs, batch, gt_fine, regressor = make_case(rng)
  config = r50.get_config().loss
  regress = regress_fn(regressor)
  low = {k: jnp.asarray(v, jnp.bfloat16) for k, v in outputs.items()}
  total, terms = losses.compute_loss(low, batch, gt_fine, regress, topology, config)
  ref, _ = losses.compute_loss(
      {k: np.asarray(v, np.float32) for k, v in low.items()},
      batch,
      gt_fine,
      regress,
      topology,
      config,
  )
  assert total.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms.values())
  np.testing.assert_allclose(total, ref, rtol=1e-6)


def test_procrustes_joint_loss_matches_numpy_and_ignores_similarity():
  from test_metrics import np_similarity_transform
  from test_metrics import random_rotation

  rng = np.random.default_rng(5)
  gt = rng.normal(size=(B, 14, 4)).astype(np.float32) * 0.3
  gt[..., 3] = rng.uniform(0.2, 1.0, (B, 14))
  pred = rng.normal(size=(B, 14, 3)).astype(np.float32) * 0.3
  has = np.float32([1, 0, 1, 1, 0, 1])
  loss = jax.jit(losses.procrustes_keypoint_3d_loss)
  got = loss(pred, gt, has)
  aligned = np.stack(
      [np_similarity_transform(p.astype(np.float64), g[:, :3]) for p, g in zip(pred, gt)]
  )
  err = gt[..., 3:] * np.abs(aligned - gt[..., :3])
  np.testing.assert_allclose(got, err[has > 0].sum() / (has.sum() * 14 * 3), rtol=1e-5)
  # A similarity transform of the prediction changes nothing...
  moved = np.stack(
      [
          s * p @ random_rotation(rng).T + rng.normal(size=3)
          for s, p in zip([0.5, 1, 2, 3, 1.5, 0.7], pred)
      ]
  ).astype(np.float32)
  np.testing.assert_allclose(loss(moved, gt, has), got, rtol=1e-4)
  # ... so its gradient has no component along a shift of the prediction,
  # and examples without 3D joints get none.
  grad = np.asarray(jax.grad(losses.procrustes_keypoint_3d_loss)(pred, gt, has))
  np.testing.assert_allclose(grad.sum(1), 0.0, atol=1e-6)
  assert np.all(grad[has == 0] == 0) and np.all(np.abs(grad[has > 0]).sum((1, 2)) > 0)


def test_procrustes_joint_loss_enters_the_total_with_its_weight():
  rng = np.random.default_rng(6)
  topology = tiny_topology()
  outputs, batch, gt_fine, regressor = make_case(rng)
  config = r50.get_config().loss
  total0, terms0 = losses.compute_loss(
      outputs, batch, gt_fine, regress_fn(regressor), topology, config
  )
  assert 'joints_3d_pa' not in terms0
  config.joints_3d_pa = 250.0
  total, terms = losses.compute_loss(
      outputs, batch, gt_fine, regress_fn(regressor), topology, config
  )
  pred = losses.centre_predictions(outputs, regress_fn(regressor))
  gt = losses.ground_truth(batch, gt_fine, regress_fn(regressor), topology)
  has_3d = batch['has_3d_joints'] * batch['mask']
  expected = losses.procrustes_keypoint_3d_loss(pred['mesh_joints'], gt['joints_3d'], has_3d)
  np.testing.assert_allclose(terms['joints_3d_pa'], expected, rtol=1e-6)
  np.testing.assert_allclose(total, total0 + 250.0 * expected, rtol=1e-5)
