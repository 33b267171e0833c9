"""Hand training and evaluation: loss and metrics against NumPy, steps, the loop, infer, aot.

The references follow FastMETRO's hand training (run_fastmetro_handmesh.py) and
FreiHAND's evaluation, written here in NumPy with boolean selection of the
labelled rows, as FastMETRO's loss functions do. Left-hand GT meshes come from
`hand_model.mirror(hand)` driven by the row's pose, a different path from the
loss's mirrored right hand.
"""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from coarsemetro_jax import aot
from coarsemetro_jax import build
from coarsemetro_jax import hand_losses
from coarsemetro_jax import hand_model
from coarsemetro_jax import hand_steps
from coarsemetro_jax import infer
from coarsemetro_jax import mesh_io
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import metrics
from coarsemetro_jax import mirror
from coarsemetro_jax import steps
from configs import tiny_hand

# MANO's 16 joints + 5 tips (16..20: thumb, index, middle, ring, pinky) in
# FreiHAND's order: wrist, thumb, index, middle, ring, pinky (MANO's order is
# wrist, index, middle, pinky, ring, thumb).
FREIHAND_FROM_MANO = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)


@pytest.fixture(scope='module')
def hand():
  return hand_model.load_hand_model('')


@pytest.fixture(scope='module')
def hand_topology():
  return mesh_topology.load_hand_topology('')


def np_regress(hand_, vertices):
  """21 FreiHAND joints of meshes [B, V, 3] (NumPy)."""
  v = np.asarray(vertices, np.float64)
  mano = np.einsum('jv,bvc->bjc', np.asarray(hand_.j_regressor, np.float64), v)
  tips = v[:, list(hand_.tip_vertex_ids)]
  return np.concatenate([mano, tips], 1)[:, list(FREIHAND_FROM_MANO)]


def hand_batch(hand_, b, seed=0, left=None, image_size=32):
  """A hand batch of the data contract from the hand model (left rows posed as MANO_LEFT)."""
  rng = np.random.default_rng(seed)
  pose = rng.normal(0, 0.3, (b, 48)).astype(np.float32)
  betas = rng.normal(0, 0.8, (b, 10)).astype(np.float32)
  left = np.zeros(b, np.float32) if left is None else np.asarray(left, np.float32)
  joints = []
  for i in range(b):
    model = hand_model.mirror(hand_) if left[i] else hand_
    joints.append(np.asarray(hand_model.forward(model, pose[i : i + 1], betas[i : i + 1])[1][0]))
  joints = np.stack(joints)  # [B, 21, 3]
  joints_2d = np.concatenate(
      [np.clip(5.0 * joints[..., :2], -1, 1), (rng.random((b, 21, 1)) > 0.2)], -1
  )
  return {
      'image': rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32),
      'joints_2d': joints_2d.astype(np.float32),
      'joints_3d': np.concatenate([joints - joints[:, :1], np.ones((b, 21, 1))], -1).astype(
          np.float32
      ),
      'pose': pose,
      'betas': betas,
      'has_2d_joints': np.ones(b, np.float32),
      'has_3d_joints': np.ones(b, np.float32),
      'has_smpl': np.ones(b, np.float32),
      'mask': np.ones(b, np.float32),
      hand_losses.LEFT_KEY: left,
  }


# ---------------------------------------------------------------------------
# Ground truth and loss.


def test_regressed_joints_are_freihands_order(hand):
  rng = np.random.default_rng(0)
  vertices = rng.normal(size=(2, 778, 3)).astype(np.float32)
  np.testing.assert_allclose(
      hand_losses.regress_joints(hand, jnp.asarray(vertices)),
      np_regress(hand, vertices),
      atol=1e-5,
  )
  # The forward pass's joints are those of its own mesh (the embedded hand
  # has no pose correctives, so its J_regressor finds its skinned joints).
  pose = rng.normal(0, 0.3, (2, 48)).astype(np.float32)
  v, j = hand_model.forward(hand, pose, np.zeros((2, 10), np.float32))
  np.testing.assert_allclose(np_regress(hand, v), j, atol=2e-3)


def test_left_rows_get_the_left_hands_mesh(hand):
  batch = hand_batch(hand, 4, left=[0, 1, 0, 1])
  vertices, joints = hand_losses.ground_truth_mesh(hand, batch)
  for i, side in enumerate(batch[hand_losses.LEFT_KEY]):
    model = hand_model.mirror(hand) if side else hand
    v, j = hand_model.forward(model, batch['pose'][i : i + 1], batch['betas'][i : i + 1])
    np.testing.assert_allclose(vertices[i], v[0], atol=1e-6)
    np.testing.assert_allclose(joints[i], j[0], atol=1e-6)
  # The same pose as a left hand is the right hand's mirror image only for
  # the mirrored pose, so a left row differs from its right-hand reading.
  right = {**batch, hand_losses.LEFT_KEY: np.zeros(4, np.float32)}
  assert (
      np.abs(np.asarray(hand_losses.ground_truth_mesh(hand, right)[0][1] - vertices[1])).max()
      > 1e-2
  )
  # Without the key every row is a right hand.
  no_key = {k: v for k, v in batch.items() if k != hand_losses.LEFT_KEY}
  np.testing.assert_array_equal(
      hand_losses.ground_truth_mesh(hand, no_key)[0], hand_losses.ground_truth_mesh(hand, right)[0]
  )


def loss_config(**overrides):
  c = ml_collections.ConfigDict(tiny_hand.get_config().loss.to_dict())
  c.update(overrides)
  return c


def np_hand_loss(out, batch, hand_, topology, c):
  """FastMETRO's hand loss in NumPy (rows with mask 0 dropped first)."""
  keep = batch['mask'] > 0
  b = {k: np.asarray(v, np.float64)[keep] for k, v in batch.items()}
  o = {k: np.asarray(v, np.float64)[keep] for k, v in out.items()}
  gt_v, gt_j = [], []
  for i in range(len(b['pose'])):
    model = hand_model.mirror(hand_) if b[hand_losses.LEFT_KEY][i] else hand_
    pose = np.nan_to_num(b['pose'][i : i + 1]).astype(np.float32)
    v, j = hand_model.forward(model, pose, np.nan_to_num(b['betas'][i : i + 1]).astype(np.float32))
    gt_v.append(np.asarray(v[0], np.float64))
    gt_j.append(np.asarray(j[0], np.float64))
  gt_fine = np.stack(gt_v) - np.stack(gt_j)[:, :1]
  gt_coarse = gt_fine[:, topology.down_indices[0]]
  mesh_j = np_regress(hand_, o['pred_3d_vertices_fine'])
  wrist = mesh_j[:, :1]
  fine, coarse = o['pred_3d_vertices_fine'] - wrist, o['pred_3d_vertices_coarse'] - wrist
  mesh_j = mesh_j - wrist
  token_j = o['pred_3d_joints'] - o['pred_3d_joints'][:, :1]
  cam = o['pred_cam']
  has3d, has_mesh = b['has_3d_joints'] == 1, b['has_smpl'] == 1

  def kp3d(pred):
    if not has3d.any():
      return 0.0
    gt = b['joints_3d'][has3d]
    conf, gt = gt[..., 3:], gt[..., :3] - gt[:, :1, :3]
    p = pred[has3d] - pred[has3d][:, :1]
    return (conf * np.abs(p - gt)).mean()

  def kp2d(pred):
    proj = cam[:, None, :1] * (pred[..., :2] + cam[:, None, 1:])
    gt = np.nan_to_num(b['joints_2d'])
    return (gt[..., 2:] * np.abs(proj - gt[..., :2])).mean()

  def vert(pred, gt):
    return np.abs(pred[has_mesh] - gt[has_mesh]).mean() if has_mesh.any() else 0.0

  faces = topology.faces[0]
  p, g = fine[has_mesh], gt_fine[has_mesh]

  def lengths(v):
    return np.concatenate(
        [
            np.sqrt(((v[:, faces[:, i]] - v[:, faces[:, j]]) ** 2).sum(-1) + 1e-8)
            for i, j in ((0, 1), (0, 2), (1, 2))
        ],
        1,
    )

  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  edge = lambda v, i, j: unit(v[:, faces[:, j]] - v[:, faces[:, i]])
  normal = unit(np.cross(edge(g, 0, 1), edge(g, 0, 2)))
  cos = np.concatenate(
      [np.abs((edge(p, i, j) * normal).sum(-1)) for i, j in ((0, 1), (0, 2), (1, 2))], 1
  )
  terms = {
      'joints_3d': kp3d(token_j) + kp3d(mesh_j),
      'vertices': c.vertices_coarse * vert(coarse, gt_coarse)
      + c.vertices_fine * vert(fine, gt_fine),
      'joints_2d': kp2d(token_j) + kp2d(mesh_j),
      'edge_gt': np.abs(lengths(p) - lengths(g)).mean(),
      'normal': cos.mean(),
  }
  total = (
      c.joints_3d * terms['joints_3d']
      + c.vertices * terms['vertices']
      + c.joints_2d * terms['joints_2d']
      + c.edge_normal * (c.edge_gt * terms['edge_gt'] + c.normal * terms['normal'])
  )
  return total, terms


def random_outputs(hand_, topology, b, seed=1):
  """Hand network outputs: a noisy posed hand (coarse level and its U[0] up-sampling)."""
  rng = np.random.default_rng(seed)
  v, _ = hand_model.forward(
      hand_, rng.normal(0, 0.3, (b, 48)).astype(np.float32), np.zeros((b, 10), np.float32)
  )
  coarse = topology.downsample(np.asarray(v), 0, 1) + rng.normal(0, 0.005, (b, 195, 3))
  coarse = coarse.astype(np.float32)
  return {
      'pred_cam': np.c_[rng.uniform(4, 6, b), rng.normal(0, 0.02, (b, 2))].astype(np.float32),
      'pred_3d_joints': rng.normal(0, 0.05, (b, 21, 3)).astype(np.float32),
      'pred_3d_vertices_coarse': coarse,
      'pred_3d_vertices_fine': topology.upsample(coarse, 1).astype(np.float32),
  }


def test_hand_loss_matches_numpy(hand, hand_topology):
  b = 6
  batch = hand_batch(hand, b, left=[0, 1, 0, 1, 1, 0])
  batch['has_3d_joints'][2] = 0
  batch['joints_3d'][2] = np.nan  # unlabelled: must not leak
  batch['has_smpl'][3] = 0
  batch['pose'][3] = np.nan
  batch['mask'][5] = 0  # eval padding: counts nowhere
  batch['joints_2d'][5] = np.nan
  batch['pose'][5] = np.nan
  out = random_outputs(hand, hand_topology, b)
  c = loss_config()
  total, terms = jax.jit(
      lambda o, bt: hand_losses.compute_loss(
          o, bt, *hand_losses.ground_truth_mesh(hand, bt), hand, hand_topology, c
      )
  )(out, batch)
  ref_total, ref = np_hand_loss(out, batch, hand, hand_topology, c)
  for name, value in ref.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-4, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(total, ref_total, rtol=2e-4)
  assert 'edge_self' not in terms and 'vertices_intermediate' not in terms
  # Every term has a finite gradient despite the NaN labels.
  grads = jax.grad(
      lambda o: hand_losses.compute_loss(
          o, batch, *hand_losses.ground_truth_mesh(hand, batch), hand, hand_topology, c
      )[0]
  )(out)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_hand_loss_without_edge_terms_and_with_edge_self(hand, hand_topology):
  batch = hand_batch(hand, 3)
  out = random_outputs(hand, hand_topology, 3)
  gt = hand_losses.ground_truth_mesh(hand, batch)
  plain, terms = hand_losses.compute_loss(
      out, batch, *gt, hand, hand_topology, loss_config(use_edge_normal=False)
  )
  assert 'edge_gt' not in terms
  c = loss_config(edge_self=0.5)
  total, terms = hand_losses.compute_loss(out, batch, *gt, hand, hand_topology, c)
  p = np.asarray(hand_losses.centre_predictions(out, hand)['vertices_fine'], np.float64)
  edges = hand_losses.face_edges(hand_topology.faces[0])
  mean_length = np.linalg.norm(p[:, edges[:, 0]] - p[:, edges[:, 1]], axis=-1).mean()
  np.testing.assert_allclose(terms['edge_self'], mean_length, rtol=1e-4)
  edge_normal = c.edge_gt * terms['edge_gt'] + c.normal * terms['normal'] + 0.5 * mean_length
  np.testing.assert_allclose(total, plain + c.edge_normal * edge_normal, rtol=1e-4)


def test_procrustes_vertex_loss_matches_numpy(hand, hand_topology):
  batch = hand_batch(hand, 4, left=[0, 1, 1, 0])
  batch['has_smpl'][2] = 0
  out = random_outputs(hand, hand_topology, 4, seed=4)
  gt = hand_losses.ground_truth_mesh(hand, batch)
  c = loss_config(vertices_pa=7.0)
  total, terms = hand_losses.compute_loss(out, batch, *gt, hand, hand_topology, c)
  plain, _ = hand_losses.compute_loss(out, batch, *gt, hand, hand_topology, loss_config())
  pred = np.asarray(hand_losses.centre_predictions(out, hand)['vertices_fine'], np.float64)
  target = np.asarray(gt[0], np.float64) - np.asarray(gt[1], np.float64)[:, :1]
  errors = [
      np.abs(np_procrustes(pred[i], target[i]) - target[i]).mean()
      for i in range(4)
      if batch['has_smpl'][i]
  ]
  np.testing.assert_allclose(terms['vertices_pa'], np.mean(errors), rtol=1e-3)
  np.testing.assert_allclose(total, plain + 7.0 * terms['vertices_pa'], rtol=1e-5)


def test_left_rows_mirrored_into_right_hands(hand, hand_topology):
  batch = hand_batch(hand, 4, left=[0, 1, 1, 0])
  right, left = hand_steps.to_right_hands(batch)
  np.testing.assert_array_equal(left, [False, True, True, False])
  assert not np.asarray(right[hand_losses.LEFT_KEY]).any()
  np.testing.assert_array_equal(right['image'][1], batch['image'][1, :, ::-1])
  np.testing.assert_array_equal(right['image'][0], batch['image'][0])
  np.testing.assert_array_equal(right['joints_3d'][2, :, 0], -batch['joints_3d'][2, :, 0])
  np.testing.assert_array_equal(right['joints_2d'][2, :, 1:], batch['joints_2d'][2, :, 1:])
  # Its GT mesh is the left hand's mirror image, vertex for vertex.
  m = np.array([-1.0, 1.0, 1.0], np.float32)
  np.testing.assert_allclose(
      hand_losses.ground_truth_mesh(hand, right)[0],
      hand_losses.ground_truth_mesh(hand, batch)[0] * np.where(left[:, None, None], m, 1),
      atol=1e-6,
  )
  # Every loss term is the same for outputs mirrored with their rows.
  out = random_outputs(hand, hand_topology, 4)
  mirrored = {
      **{k: out[k] * np.where(left[:, None, None], m, 1) for k in out if k != 'pred_cam'},
      'pred_cam': out['pred_cam'] * np.where(left[:, None], [1, -1, 1], 1).astype(np.float32),
  }
  c = loss_config(vertices_pa=3.0, joints_3d_pa=2.0)
  loss = lambda o, b: hand_losses.compute_loss(
      o, b, *hand_losses.ground_truth_mesh(hand, b), hand, hand_topology, c
  )
  (total, terms), (total_r, terms_r) = loss(out, batch), loss(mirrored, right)
  for name, value in terms.items():
    np.testing.assert_allclose(terms_r[name], value, rtol=2e-4, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(total_r, total, rtol=2e-4)


def test_camera_bias_init(hand_topology):
  config = tiny_hand.get_config()
  config.data.image_size = 32
  config.model.cam_bias_init = (10.0, 0.5, -0.25)
  model = build.build(config, body=False).model
  mesh = steps.make_device_mesh(jax.devices()[:1])
  state, _ = steps.create_train_state(config, model, jax.random.key(0), mesh, (32, 32, 3), 1)
  np.testing.assert_array_equal(state.params['cam_predictor']['bias'], [10.0, 0.5, -0.25])
  del hand_topology


# ---------------------------------------------------------------------------
# Metrics.


def np_procrustes(source, target):
  """METRO's compute_similarity_transform for one example (NumPy, float64)."""
  mu1, mu2 = source.mean(0), target.mean(0)
  x1, x2 = (source - mu1).T, (target - mu2).T
  k = x1 @ x2.T
  u, _, vh = np.linalg.svd(k)
  z = np.eye(3)
  z[-1, -1] = np.sign(np.linalg.det(u @ vh))
  r = vh.T @ z @ u.T
  scale = np.trace(r @ k) / (x1**2).sum()
  return (scale * r @ x1).T + mu2


def np_f_score(pred, gt, threshold):
  d = np.linalg.norm(gt[:, None] - pred[None], axis=-1)  # [M, N]
  precision = (d.min(1) < threshold).mean()
  recall = (d.min(0) < threshold).mean()
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_hand_metrics_match_numpy():
  rng = np.random.default_rng(3)
  batches, expected = [], {'pa_mpjpe': [], 'pa_mpvpe': [], 'f5': [], 'f15': []}
  for k in range(2):
    b = 5
    gt_v = rng.normal(0, 0.05, (b, 778, 3))
    pred_v = gt_v @ np.diag([1.1, 0.9, 1.0]) + rng.normal(0, 0.004 * (k + 1), (b, 778, 3))
    pred_v = pred_v + rng.normal(0, 0.1, (b, 1, 3))  # a shift PA removes
    gt_j, pred_j = rng.normal(0, 0.05, (b, 21, 3)), rng.normal(0, 0.05, (b, 21, 3))
    has3d, has_mesh, mask = rng.random(b) > 0.3, rng.random(b) > 0.3, np.ones(b)
    mask[-1] = 0
    batches.append((pred_j, gt_j, pred_v, gt_v, has3d, has_mesh, mask))
    for i in range(b):
      if mask[i] and has3d[i]:
        d = np.linalg.norm(np_procrustes(pred_j[i], gt_j[i]) - gt_j[i], axis=-1)
        expected['pa_mpjpe'].append(1000 * d.mean())
      if mask[i] and has_mesh[i]:
        aligned = np_procrustes(pred_v[i], gt_v[i])
        expected['pa_mpvpe'].append(1000 * np.linalg.norm(aligned - gt_v[i], axis=-1).mean())
        expected['f5'].append(np_f_score(aligned, gt_v[i], 0.005))
        expected['f15'].append(np_f_score(aligned, gt_v[i], 0.015))
  collection = None
  for arrays in batches:
    arrays = [jnp.asarray(a, jnp.float32) for a in arrays]
    update = metrics.hand_eval_metrics(metrics.hand_errors_from_arrays(*arrays))
    collection = update if collection is None else collection.merge(update)
  result = {k: float(v) for k, v in collection.compute().items()}
  assert collection.pa_mpvpe.count == len(expected['pa_mpvpe'])
  assert collection.pa_mpjpe.count == len(expected['pa_mpjpe'])
  for name, values in expected.items():
    assert result[name] == pytest.approx(np.mean(values), rel=2e-3, abs=2e-3), name
  # Not degenerate: the F-scores lie strictly inside (0, 1) and differ.
  assert 0.05 < result['f5'] < result['f15'] < 0.999


def test_hand_eval_step_on_8_devices(hand, hand_topology):
  config = tiny_hand.get_config()
  config.data.image_size = 32
  _, _, model = build.build(config, body=False)
  device_mesh = steps.make_device_mesh()
  batch_sharding = steps.batch_sharding(device_mesh)
  state, state_sharding = steps.create_train_state(
      config, model, jax.random.key(0), device_mesh, (32, 32, 3), steps_per_epoch=1
  )
  batch = hand_batch(hand, 8, left=[0, 1] * 4)
  batch['mask'][6:] = 0
  batch['has_smpl'][0] = 0
  eval_step = hand_steps.make_eval_step(
      config, model, hand, hand_topology, state_sharding, batch_sharding
  )
  collection, pred = eval_step(state, jax.device_put(batch, batch_sharding))
  assert collection.pa_mpjpe.count == 6 and collection.pa_mpvpe.count == 5
  # The metrics are those of the step's own centred predictions.
  pred = jax.device_get(pred)
  gt_v, gt_j = hand_losses.ground_truth_mesh(hand, batch)
  gt = hand_losses.ground_truth(batch, gt_v, gt_j, hand_topology)
  np.testing.assert_allclose(pred['pred_3d_joints'][:, 0], 0, atol=1e-6)
  np.testing.assert_allclose(
      pred['pred_3d_joints'], np_regress(hand, pred['pred_vertices']), atol=1e-5
  )
  errors = metrics.hand_errors_from_arrays(
      pred['pred_3d_joints'],
      gt['joints_3d'][..., :3],
      pred['pred_vertices'],
      gt['vertices_fine'],
      batch['has_3d_joints'],
      batch['has_smpl'],
      batch['mask'],
  )
  for name, value in collection.compute().items():
    keep = np.asarray(errors['joints_mask' if name == 'pa_mpjpe' else 'vertices_mask'])
    np.testing.assert_allclose(value, np.asarray(errors[name])[keep].mean(), rtol=1e-4)


def test_hand_flip_test_mirrors_back_without_permuting():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)

  def apply(x):  # depends on the image's left-right layout
    s = x.mean((1, 2, 3))
    col = x[:, :, :, 0].mean(1)  # [B, 8]
    base = jnp.arange(30.0).reshape(1, 10, 3) * col[:, :1, None]  # [B, 10, 3]
    return {
        'pred_3d_vertices_fine': base + col[:, :1, None],
        'pred_3d_joints': jnp.tile(col[:, :3, None], (1, 1, 3)),
        'pred_cam': jnp.stack([s, col[:, 0], col[:, -1]], -1),
        'pred_3d_vertices_coarse': base[:, :2],
    }

  out = mirror.hand_flip_test(apply, images)
  plain, flipped = apply(images), apply(images[:, :, ::-1])
  m = np.array([-1.0, 1.0, 1.0])
  for key in ('pred_3d_vertices_fine', 'pred_3d_joints'):
    np.testing.assert_allclose(out[key], 0.5 * (plain[key] + m * flipped[key]), rtol=1e-6)
  np.testing.assert_allclose(
      out['pred_cam'],
      0.5 * (plain['pred_cam'] + np.array([1, -1, 1]) * flipped['pred_cam']),
      rtol=1e-6,
  )
  np.testing.assert_array_equal(out['pred_3d_vertices_coarse'], plain['pred_3d_vertices_coarse'])


# ---------------------------------------------------------------------------
# Build, aot, infer.


def test_build_loads_the_hand_model(hand_topology):
  config = tiny_hand.get_config()
  topology, hand_, model = build.build(config)
  assert isinstance(hand_, hand_model.HandModel) and hand_.num_vertices == 778 and model.hand
  del config.hand_model
  with pytest.raises(hand_model.HandModelError, match='config.hand_model is missing'):
    build.build(config)
  config = tiny_hand.get_config()
  config.hand_model.path = '/nonexistent/MANO_RIGHT.pkl'
  with pytest.raises(hand_model.HandModelError, match='hand model file not found'):
    build.build(config)
  del topology, hand_topology


@pytest.mark.parametrize('name', ['hand_embedded.py', 'tiny_hand.py', 'tiny_hand.py:fastmetro-S'])
def test_hand_recipe_files_load_and_build(name):
  from coarsemetro_jax import config_files

  config = config_files.load(os.path.join(os.path.dirname(tiny_hand.__file__), name))
  assert config.model.hand and config.hand_model.path == ''
  assert config.loss.use_edge_normal and config.loss.vertices_fine == 0.5
  model = build.build(config, body=False).model
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x), images)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert out['pred_3d_vertices_fine'].shape == (2, 778, 3)
  assert out['pred_3d_joints'].shape == (2, 21, 3)


def test_aot_compiles_the_tiny_hand_for_8_cpu_devices(capsys):
  argv = ['aot', f'--config={tiny_hand.__file__}', '--topology=cpu:8', '--per_chip_batch=2']
  assert aot.main(argv) == 0
  text = capsys.readouterr().out
  assert 'CoarseMETRO' in text and 'Hand' in text and 'train step:' in text
  assert 'eval step:' in text and 'global batch 16' in text


def test_aot_batch_is_the_hand_contract():
  mesh = steps.make_device_mesh(jax.devices()[:1])
  batch = aot.abstract_batch(4, 64, 'float32', steps.batch_sharding(mesh), hand=True)
  shapes = {k: v.shape[1:] for k, v in batch.items()}
  assert shapes['joints_2d'] == (21, 3) and shapes['joints_3d'] == (21, 4)
  assert shapes['pose'] == (48,) and shapes['betas'] == (10,) and shapes['mask'] == ()
  assert shapes['is_left'] == ()
  assert aot.abstract_batch(4, 64, 'float32', steps.batch_sharding(mesh))['pose'].shape == (4, 72)


# ---------------------------------------------------------------------------
# The training loop end to end (rendered synthetic hands), infer.

NUM_TRAIN, NUM_TEST, NUM_STEPS = 16, 11, 3


def hand_run_config():
  config = tiny_hand.get_config()
  config.data.image_size = 32
  config.num_train_steps = NUM_STEPS
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 1000
  config.num_eval_images = 2
  config.eval_flip = True
  return config


@pytest.fixture(scope='module')
def trained_hand(tmp_path_factory):
  """A tiny hand network trained NUM_STEPS steps on rendered synthetic hands.

  The whole path of configs/hand_embedded.py, small: render the synthetic
  hands, train, evaluate next to the mean-pose baseline, then evaluate the
  saved checkpoint again (mode='eval').
  """
  from coarsemetro_jax import train

  config = hand_run_config()
  config.data.source = 'synthetic'
  config.data.synthetic.dir = str(tmp_path_factory.mktemp('synthetic'))
  config.data.synthetic.num_train = NUM_TRAIN
  config.data.synthetic.num_test = NUM_TEST
  config.data.synthetic.image_size = 48
  config.data.synthetic.workers = 1
  workdir = str(tmp_path_factory.mktemp('hand_run'))
  summary = train.train_and_evaluate(config, workdir)
  again = train.train_and_evaluate(config, workdir, mode='eval')
  return config, workdir, summary, again


def test_tiny_hand_trains_and_evaluates_end_to_end(trained_hand):
  config, workdir, summary, again = trained_hand
  del config
  assert summary['step'] == NUM_STEPS
  for result in (summary['eval'], summary['eval_no_flip']):
    assert set(result) == {'pa_mpjpe', 'pa_mpvpe', 'f5', 'f15', 'pa_mpjpe_count', 'pa_mpvpe_count'}
    assert result['pa_mpjpe_count'] == result['pa_mpvpe_count'] == NUM_TEST
    assert 0 < result['pa_mpvpe'] < 200 and 0 <= result['f5'] <= result['f15'] <= 1
  assert {'loss_edge_gt', 'loss_normal', 'loss_vertices_fine'} <= set(summary['train'])
  assert all(np.isfinite(v) for v in summary['train'].values())
  # The eval of the saved checkpoint gives the same numbers.
  for key, value in summary['eval'].items():
    assert again['eval'][key] == pytest.approx(value, rel=1e-5), key
  # The mean-pose baseline: the training set's mean hand, on the same test rows.
  baseline = summary['mean_pose_baseline']
  assert baseline['count'] == NUM_TEST and baseline['pa_mpvpe'] > 0
  assert 0 < baseline['f5'] < baseline['f15'] <= 1
  table = open(os.path.join(workdir, 'eval_results.md')).read().splitlines()
  assert table[0] == '| model | PA-MPJPE (mm) | PA-MPVPE (mm) | F@5 mm | F@15 mm | examples |'
  assert table[2].startswith(f'| coarsemetro step {NUM_STEPS} | ')
  assert table[3].startswith(f'| coarsemetro step {NUM_STEPS} + flip test | ')
  assert table[3].endswith(f'| {NUM_TEST} |')
  assert table[4].startswith('| mean-pose baseline | ')
  picture = cv2.imread(summary['picture'])
  assert picture.shape == (2 * 32, 3 * 32, 3)
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    assert json.load(f)['eval'] == pytest.approx(summary['eval'])


def test_infer_hand_writes_a_778_vertex_mesh(trained_hand, hand, tmp_path):
  config, workdir, _, _ = trained_hand
  image = tmp_path / 'hand.png'
  assert cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (50, 40, 3), np.uint8))
  out = tmp_path / 'out'
  result = infer.run(config, workdir, [str(image)], str(out), hand=True, progress=False)
  assert result.written == ['hand'] and not result.failures
  vertices, faces = mesh_io.read_obj(out / 'hand.obj')
  assert vertices.shape == (778, 3)
  np.testing.assert_array_equal(faces, np.asarray(hand.faces))
  np.testing.assert_array_equal(mesh_io.read_ply(out / 'hand.ply')[0], vertices)
  record = json.loads((out / 'hand.json').read_text())
  assert record['joint_names'] == list(hand_model.HAND_JOINT_NAMES)
  assert record['mesh']['vertices'] == 778 and 'wrist' in record['mesh']['origin']
  joints = np.array(record['joints_3d'])
  np.testing.assert_allclose(joints, np_regress(hand, vertices[None])[0], atol=1e-5)
  np.testing.assert_allclose(joints[0], 0, atol=1e-6)
  cam = np.array([record['camera'][k] for k in ('s', 'tx', 'ty')])
  np.testing.assert_allclose(
      record['joints_2d_crop'], cam[0] * (joints[:, :2] + cam[1:]), rtol=1e-5, atol=1e-5
  )
  # --hand is a check on the config: a body config is refused in one line.
  from configs import tiny

  with pytest.raises(ValueError, match=r'--hand needs a hand config \(config.model.hand\)'):
    infer.run(tiny.get_config(), workdir, [str(image)], str(out), hand=True, progress=False)


def test_hand_recipes_schedules_and_rotations():
  from configs import embedded
  from configs import hand_embedded
  from configs import hand_h64
  from configs import hand_r50

  # FreiHAND fine-tuning: FastMETRO's lr, METRO's hand rotations (rot_factor 90).
  for module in (hand_r50, hand_h64):
    config = module.get_config()
    assert config.optim.lr == 1e-4 and config.data.rot_factor == 90.0
  # From scratch on the renders: the embedded body's lr and augmentation.
  body, config = embedded.get_config(), hand_embedded.get_config()
  assert config.optim.lr == body.optim.lr == 1e-3
  assert config.data.rot_factor == body.data.rot_factor == 0.0
