"""SMPL-parameter head losses against a NumPy transcription of FastMETRO's run_train."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial.transform import Rotation

from coarsemetro_jax import body_model as bm
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import smpl_param_loss

B, V = 5, 12


def _body(rng):
  weights = rng.uniform(size=(V, 24)) ** 4
  weights /= weights.sum(1, keepdims=True)
  j_reg = rng.uniform(size=(24, V))
  j_reg /= j_reg.sum(1, keepdims=True)
  arrays = {
      'v_template': rng.normal(size=(V, 3)),
      'shapedirs': rng.normal(0, 0.1, (V, 3, 10)),
      'weights': weights,
      'j_regressor': j_reg,
      'faces': rng.integers(0, V, (4, 3)),
      'posedirs': rng.normal(0, 0.1, (V, 3, 207)),
  }
  return arrays, bm._assemble(arrays, 'tiny', jnp.float32)


def _topology():
  levels = (V, 6, 3)
  return mesh_topology.MeshTopology(
      num_vertices=levels,
      faces=tuple(np.zeros((0, 3), np.int32) for _ in levels),
      edges=tuple(np.zeros((0, 2), np.int32) for _ in levels),
      down_indices=(np.int32([0, 2, 4, 6, 8, 10]), np.int32([1, 3, 5])),
      up_indices=(np.zeros((V, 3), np.int32), np.zeros((6, 3), np.int32)),
      up_weights=(np.zeros((V, 3), np.float32), np.zeros((6, 3), np.float32)),
      coarse_adjacency=np.ones((3, 3), bool),
  )


def _case(rng):
  outputs = {
      'pred_rotmat': Rotation.random(B * 24, random_state=1)
      .as_matrix()
      .reshape(B, 24, 3, 3)
      .astype(np.float32),
      'pred_betas': rng.normal(size=(B, 10)).astype(np.float32),
      'pred_cam': rng.normal(size=(B, 3)).astype(np.float32),
  }
  joints_2d = rng.uniform(-1, 1, (B, 24, 3))
  joints_2d[..., 2] = rng.integers(0, 2, (B, 24))
  joints_3d = rng.normal(size=(B, 24, 4))
  joints_3d[..., 3] = rng.uniform(0, 1, (B, 24))
  pose = rng.normal(0, 0.5, (B, 72))
  betas = rng.normal(size=(B, 10))
  pose[1], betas[1] = np.nan, np.nan  # has_smpl 0: never read
  joints_3d[2] = np.nan  # has_3d_joints 0: never read
  batch = {
      'joints_2d': joints_2d,
      'joints_3d': joints_3d,
      'pose': pose,
      'betas': betas,
      'has_2d_joints': np.float32([1, 1, 0, 1, 1]),
      'has_3d_joints': np.float32([1, 1, 0, 1, 1]),
      'has_smpl': np.float32([1, 0, 1, 1, 1]),
      'mask': np.float32([1, 1, 1, 1, 0]),
  }  # example 4 is padding
  batch = {k: np.asarray(v, np.float32) for k, v in batch.items()}
  gt_fine = rng.normal(size=(B, V, 3)).astype(np.float32)
  h36m = rng.uniform(size=(17, V))
  return outputs, batch, gt_fine, (h36m / h36m.sum(1, keepdims=True)).astype(np.float32)


def _np_lbs(arrays, rotmats, betas):
  """SMPL skinning (float64, one example) with 4x4 transform chains."""
  v = arrays['v_template'] + arrays['shapedirs'] @ betas
  rest = arrays['j_regressor'] @ v
  v = v + ((rotmats[1:] - np.eye(3)).ravel() @ arrays['posedirs'].reshape(-1, 207).T).reshape(-1, 3)
  world = []
  for j, p in enumerate(joint_tables.SMPL_PARENTS):
    local = np.eye(4)
    local[:3, :3], local[:3, 3] = rotmats[j], rest[j] - (rest[p] if p >= 0 else 0)
    world.append(local if p < 0 else world[p] @ local)
  world = np.stack(world)
  world[:, :3, 3] -= np.einsum('jab,jb->ja', world[:, :3, :3], rest)
  per_vertex = np.einsum('vj,jab->vab', arrays['weights'], world)
  return np.einsum('vab,vb->va', per_vertex, np.concatenate([v, np.ones((V, 1))], 1))[:, :3]


def _np_smpl_loss(arrays, outputs, batch, gt_fine, h36m):
  """FastMETRO's L_smpl with boolean indexing and torch-style means."""
  o = {k: np.float64(v) for k, v in outputs.items()}
  real = batch['mask'] == 1
  smpl = (batch['has_smpl'] == 1) & real
  has3d = (batch['has_3d_joints'] == 1) & real
  gt_rot = Rotation.from_rotvec(batch['pose'][smpl].reshape(-1, 3)).as_matrix()
  param = np.mean((o['pred_rotmat'][smpl].reshape(-1, 3, 3) - gt_rot) ** 2) + 0.1 * np.mean(
      (o['pred_betas'][smpl] - batch['betas'][smpl]) ** 2
  )
  verts = np.stack([_np_lbs(arrays, o['pred_rotmat'][i], o['pred_betas'][i]) for i in range(B)])
  j17 = np.einsum('jv,bvc->bjc', h36m, verts)
  verts = verts - j17[:, :1]
  mesh_joints = j17[:, joint_tables.H36M_J17_TO_J14] - j17[:, :1]
  gt_j17 = np.einsum('jv,bvc->bjc', h36m, gt_fine)
  gt_verts = gt_fine - gt_j17[:, :1]
  j24 = np.float64(batch['joints_3d'])
  gt3d = j24[:, joint_tables.J24_TO_J14].copy()
  gt3d[..., :3] -= j24[:, None, joint_tables.J24_PELVIS, :3]

  def hip(x):
    return x - 0.5 * (x[:, 2:3] + x[:, 3:4])

  kp3d = np.mean(gt3d[has3d, :, 3:] * np.abs(hip(mesh_joints[has3d]) - hip(gt3d[has3d, :, :3])))
  cam = o['pred_cam']
  proj = cam[:, None, :1] * (mesh_joints[..., :2] + cam[:, None, 1:])
  gt2d = np.float64(batch['joints_2d'])[:, joint_tables.J24_TO_J14]
  kp2d = np.mean(gt2d[real, :, 2:] * np.abs(proj[real] - gt2d[real, :, :2]))
  vert = np.mean(np.abs(verts[smpl] - gt_verts[smpl]))
  return param + kp3d + kp2d + vert, {
      'smpl_params': param,
      'smpl_joints_3d': kp3d,
      'smpl_joints_2d': kp2d,
      'smpl_vertices': vert,
  }


def _loss_fn(body, topology, batch, gt_fine, h36m):
  regress = lambda v: jnp.einsum('jv,bvc->bjc', h36m, v)
  return lambda outputs: smpl_param_loss.smpl_loss(outputs, batch, gt_fine, regress, topology, body)


def test_smpl_loss_matches_numpy():
  rng = np.random.default_rng(0)
  arrays, body = _body(rng)
  outputs, batch, gt_fine, h36m = _case(rng)
  total, terms = jax.jit(_loss_fn(body, _topology(), batch, gt_fine, h36m))(outputs)
  ref_total, ref_terms = _np_smpl_loss(arrays, outputs, batch, gt_fine, h36m)
  for name, value in ref_terms.items():
    assert value > 0.01, name
    np.testing.assert_allclose(terms[name], value, rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(total, ref_total, rtol=1e-4)


def test_param_loss_hand_case():
  # Identity prediction vs a 90-degree turn about z: the rotmats differ in 4
  # of 9 entries by 1 (cos) / 1 (sin) -> per matrix (1 + 1 + 1 + 1) / 9.
  pose = np.zeros((2, 72), np.float32)
  pose[:, 5] = np.pi / 2  # joint 1 about z
  rotmat = np.broadcast_to(np.eye(3, dtype=np.float32), (2, 24, 3, 3))
  betas = np.zeros((2, 10), np.float32)
  pred_betas = np.full((2, 10), 2.0, np.float32)
  loss = smpl_param_loss.param_loss(
      jnp.asarray(rotmat), jnp.asarray(pred_betas), pose, betas, np.float32([1, 1])
  )
  expected = (4.0 / 9) / 24 + 0.1 * 4.0
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert (
      smpl_param_loss.param_loss(
          jnp.asarray(rotmat), jnp.asarray(pred_betas), pose, betas, np.float32([0, 0])
      )
      == 0.0
  )


def test_gradients_skip_the_camera_and_unlabelled_nans():
  rng = np.random.default_rng(1)
  _, body = _body(rng)
  outputs, batch, gt_fine, h36m = _case(rng)
  loss_fn = _loss_fn(body, _topology(), batch, gt_fine, h36m)
  grads = jax.grad(lambda o: loss_fn(o)[0])({k: jnp.asarray(v) for k, v in outputs.items()})
  assert not np.any(grads['pred_cam'])  # the camera is detached
  for name in ('pred_rotmat', 'pred_betas'):
    assert np.all(np.isfinite(grads[name])) and np.any(grads[name]), name


def test_total_loss_weights():
  assert smpl_param_loss.total_loss(2.0, 3e6) == 1000.0 * 2.0 + 1e-8 * 3e6
  assert smpl_param_loss.total_loss(2.0, 3.0, usual_weight=1.0) == 2003.0
