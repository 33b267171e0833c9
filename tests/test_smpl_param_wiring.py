"""The SMPL-parameter head wired through the models, steps, init_from and infer.

Runs configs/tiny.py with `config.model.smpl_param_regressor` on, on the
embedded body model and mesh hierarchy.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
import test_infer

from coarsemetro_jax import body_model
from coarsemetro_jax import build
from coarsemetro_jax import infer
from coarsemetro_jax import infer_outputs
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import losses
from coarsemetro_jax import metrics
from coarsemetro_jax import models
from coarsemetro_jax import smpl_param_loss
from coarsemetro_jax import steps
from coarsemetro_jax.convert import orbax_variables as convert_checkpoint
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.models import smpl_param_regressor as spr
from configs import tiny

B, S = 8, 64
HEAD = 'smpl_parameter_regressor'


def head_config(name='fastmetro'):
  config = tiny.get_config(name)
  config.model.smpl_param_regressor = True
  return config


def make_batch(seed=0, pose_scale=0.3):
  rng = np.random.default_rng(seed)
  joints_2d = rng.uniform(-1, 1, (B, 24, 3)).astype(np.float32)
  joints_2d[..., 2] = rng.integers(0, 2, (B, 24))
  joints_3d = rng.normal(size=(B, 24, 4)).astype(np.float32) * 0.3
  joints_3d[..., 3] = 1.0
  return {
      'image': rng.normal(size=(B, S, S, 3)).astype(np.float32),
      'joints_2d': joints_2d,
      'joints_3d': joints_3d,
      'pose': rng.normal(size=(B, 72)).astype(np.float32) * pose_scale,
      'betas': rng.normal(size=(B, 10)).astype(np.float32),
      'has_2d_joints': np.ones(B, np.float32),
      'has_3d_joints': np.float32([1, 1, 0, 1, 1, 0, 1, 1]),
      'has_smpl': np.float32([1, 0, 1, 1, 0, 1, 1, 1]),
      'mask': np.float32([1, 1, 1, 1, 1, 1, 1, 0]),
  }


def setup(config):
  topology, body, model = build.build(config)
  device_mesh = steps.make_device_mesh(jax.devices()[:1])
  state, sharding = steps.create_train_state(
      config, model, jax.random.key(0), device_mesh, (S, S, 3)
  )
  return topology, body, model, state, sharding, steps.batch_sharding(device_mesh)


# ---------------------------------------------------------------------------
# Models.


def test_coarsemetro_head_reads_the_raw_intermediate_mesh(topology):
  """(FastMETRO's is checked against PyTorch in test_convert_roundtrip.py.)"""
  config = head_config('coarsemetro')
  model = models.build_model(config.model, topology)
  images = np.random.default_rng(0).normal(size=(2, S, S, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  assert out['pred_rotmat'].shape == (2, 24, 3, 3) and out['pred_betas'].shape == (2, 10)
  head = {c: variables[c][HEAD] for c in ('params', 'batch_stats')}
  alone = spr.SMPLParamRegressor().apply(head, out['pred_3d_vertices_intermediate'])
  np.testing.assert_allclose(out['pred_rotmat'], alone['pred_rotmat'], atol=1e-5)
  np.testing.assert_allclose(out['pred_betas'], alone['pred_betas'], atol=1e-5)
  assert np.abs(out['pred_betas']).max() > 1e-3
  # Without the flag: no head, no variables, no outputs.
  config.model.smpl_param_regressor = False
  plain = models.build_model(config.model, topology)
  shapes = jax.eval_shape(lambda x: plain.init_with_output(jax.random.key(0), x), images)
  assert 'pred_rotmat' not in shapes[0] and HEAD not in shapes[1]['params']


# ---------------------------------------------------------------------------
# Train step.


def test_train_step_loss_is_the_weighted_sum_of_its_parts():
  config = head_config()
  config.loss.smpl_param, config.loss.smpl_param_usual = 2.0, 0.5  # both parts visible
  config.bn_group_size = 0
  topology, body, model, state, sharding, batch_sharding = setup(config)
  train_step = steps.make_train_step(config, model, body, topology, sharding, batch_sharding)
  batch = make_batch()
  params = jax.tree.map(np.asarray, state.params)  # the state is donated
  stats = jax.tree.map(np.asarray, state.batch_stats)
  rng = jax.random.key(7)
  new_state, out = train_step(state, jax.device_put(batch, batch_sharding), rng)

  # By hand: the same forward pass (step 0's keys), each loss on its own.
  @jax.jit
  def parts(params, stats, batch):
    outputs, _ = steps.apply_train(
        model, {'params': params, 'batch_stats': stats}, batch['image'], steps.step_rngs(rng, 0)
    )
    gt_vertices, _ = body_model.forward(body, batch['pose'], batch['betas'])
    regress = functools.partial(body_model.h36m_joints, body)
    usual, _ = losses.compute_loss(outputs, batch, gt_vertices, regress, topology, config.loss)
    smpl, terms = smpl_param_loss.smpl_loss(outputs, batch, gt_vertices, regress, topology, body)
    return usual, smpl, terms

  usual, smpl, terms = parts(params, stats, batch)
  np.testing.assert_allclose(out['loss_usual'], usual, rtol=1e-5)
  np.testing.assert_allclose(out['loss_smpl'], smpl, rtol=1e-5)
  np.testing.assert_allclose(out['loss_smpl_params'], terms['smpl_params'], rtol=1e-5)
  np.testing.assert_allclose(out['loss'], 2.0 * smpl + 0.5 * usual, rtol=1e-5)
  assert float(smpl) > 0.1 and float(usual) > 0.1

  # The head trained: its weights and its BatchNorm statistics (train mode) moved.
  moved = lambda a, b: not np.allclose(np.asarray(a), b)
  assert moved(
      new_state.params[HEAD]['regressor_3']['kernel'], params[HEAD]['regressor_3']['kernel']
  )
  assert moved(
      new_state.batch_stats[HEAD]['regressor_0']['fc_block_1']['mean'],
      stats[HEAD]['regressor_0']['fc_block_1']['mean'],
  )


# ---------------------------------------------------------------------------
# Eval step.


def test_eval_step_scores_the_mesh_of_the_predicted_parameters():
  """A head that predicts the zero pose and mean shape, on examples with those labels:
  the SMPL mesh is the GT mesh (smpl_mpve 0) while the network's mesh is not."""
  config = head_config()
  topology, body, model, state, sharding, batch_sharding = setup(config)
  last = state.params[HEAD]['regressor_3']
  identity = np.concatenate(
      [np.tile(np.eye(3, dtype=np.float32).ravel(), 24), np.zeros(10, np.float32)]
  )
  params = dict(state.params)
  params[HEAD] = dict(
      params[HEAD],
      regressor_3={'kernel': jnp.zeros_like(last['kernel']), 'bias': jnp.asarray(identity)},
  )
  state = state.replace(params=params)
  batch = make_batch(seed=1, pose_scale=0.0)
  batch['betas'][:] = 0.0
  eval_step = steps.make_eval_step(config, model, body, topology, sharding, batch_sharding)
  collection, pred = eval_step(state, jax.device_put(batch, batch_sharding))
  result = {k: float(v) for k, v in collection.compute().items()}

  assert result['smpl_mpve'] < 1e-3 and result['mpve'] > 1.0
  np.testing.assert_allclose(
      pred['pred_rotmat'], np.broadcast_to(np.eye(3), (B, 24, 3, 3)), atol=1e-6
  )
  # MPJPE / PA-MPJPE of the template's J14 (centred at its H36M pelvis) by hand,
  # over the real examples with 3D joints.
  j17 = np.asarray(body_model.h36m_joints(body, body.v_template[None]))[0]
  pred_j14 = j17[list(joint_tables.H36M_J17_TO_J14)] - j17[joint_tables.H36M_PELVIS]
  gt = batch['joints_3d'][:, list(joint_tables.J24_TO_J14), :3]
  gt = gt - batch['joints_3d'][:, None, joint_tables.J24_PELVIS, :3]
  keep = (batch['has_3d_joints'] > 0) & (batch['mask'] > 0)
  pred_j14 = np.broadcast_to(pred_j14, gt.shape)
  for name, fn in (('smpl_mpjpe', metrics.mpjpe), ('smpl_pa_mpjpe', metrics.pa_mpjpe)):
    want = 1000 * np.asarray(fn(jnp.asarray(pred_j14), jnp.asarray(gt)))[keep].mean()
    np.testing.assert_allclose(result[name], want, rtol=1e-4, err_msg=name)
  assert result['smpl_mpjpe'] != result['mpjpe']


# ---------------------------------------------------------------------------
# init_from a checkpoint without the head.


def test_checkpoint_without_the_head_initialises_the_rest(tmp_path, topology):
  config = head_config()
  model = models.build_model(config.model, topology)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, S, S, 3)))
  abstract = {c: abstract[c] for c in ('params', 'batch_stats')}
  fresh = jax.tree.map(lambda s: np.full(s.shape, 2.0, s.dtype), abstract)
  saved = {
      c: {
          k: jax.tree.map(lambda s: np.ones(s.shape, s.dtype), v)
          for k, v in abstract[c].items()
          if k != HEAD
      }
      for c in abstract
  }
  convert_checkpoint.save_converted(tmp_path / 'plain', saved, {'scope': 'model'})
  loaded = convert_checkpoint.restore_into(tmp_path / 'plain', fresh)
  flat = state_dict_lib.flatten(loaded)
  assert all(np.all(np.asarray(v) == (2.0 if f'/{HEAD}/' in p else 1.0)) for p, v in flat.items())
  # Inference (an abstract target) has nothing to keep: the head is missing.
  with pytest.raises(ValueError, match=f'missing in the checkpoint .*{HEAD}'):
    convert_checkpoint.restore_into(tmp_path / 'plain', abstract)


# ---------------------------------------------------------------------------
# infer's JSON.


def test_rotmat_to_axis_angle_matches_scipy():
  rng = np.random.default_rng(0)
  rotations = Rotation.random(200, random_state=1)
  axes = rng.normal(size=(6, 3))
  axes /= np.linalg.norm(axes, axis=1, keepdims=True)
  angles = [0.0, 1e-12, 1e-7, 1e-4, np.pi - 1e-4, np.pi - 1e-7]
  edge = Rotation.from_rotvec(axes * np.array(angles)[:, None])
  rotvecs = np.concatenate([rotations.as_rotvec(), edge.as_rotvec()])
  matrices = Rotation.from_rotvec(rotvecs).as_matrix()
  ours = infer_outputs.rotmat_to_axis_angle(matrices)
  np.testing.assert_allclose(ours, Rotation.from_matrix(matrices).as_rotvec(), atol=1e-9)
  np.testing.assert_array_equal(infer_outputs.rotmat_to_axis_angle(np.eye(3)), np.zeros(3))
  # Tiny angles keep their relative precision.
  np.testing.assert_allclose(ours[-5], rotvecs[-5], rtol=1e-6, atol=0)
  # At exactly pi either sign is the rotation; the angle is pi.
  half_turn = Rotation.from_rotvec(np.pi * axes).as_matrix()
  got = infer_outputs.rotmat_to_axis_angle(half_turn)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.pi, atol=1e-9)
  np.testing.assert_allclose(Rotation.from_rotvec(got).as_matrix(), half_turn, atol=1e-9)
  # A float32 network rotation (not exactly orthogonal) stays consistent.
  noisy = matrices.astype(np.float32)
  np.testing.assert_allclose(
      Rotation.from_rotvec(infer_outputs.rotmat_to_axis_angle(noisy)).as_matrix(),
      matrices,
      atol=1e-5,
  )


def test_infer_json_has_the_smpl_pose_and_shape(tmp_path, topology):
  del topology  # the embedded hierarchy
  config = head_config()
  model = build.build(config, body=False).model
  variables = test_infer.random_variables(model, config.data.image_size)
  checkpoint = str(tmp_path / 'ckpt')
  convert_checkpoint.save_converted(
      checkpoint, variables, {'kind': 'test', 'scope': 'model', 'model': config.model.to_dict()}
  )
  image = test_infer.write_image(
      tmp_path / 'a.png', np.random.default_rng(0).integers(0, 256, (80, 70, 3), np.uint8)
  )
  result = infer.run(
      config, checkpoint, [image], str(tmp_path / 'out'), batch_size=2, progress=False
  )
  assert result.written == ['a'] and not result.failures
  record = json.loads((tmp_path / 'out' / 'a.json').read_text())
  smpl = record['smpl']
  rotmat = np.asarray(smpl['pose_rotmat'])
  assert rotmat.shape == (24, 3, 3) and np.asarray(smpl['betas']).shape == (10,)
  np.testing.assert_allclose(
      rotmat @ np.swapaxes(rotmat, 1, 2), np.broadcast_to(np.eye(3), rotmat.shape), atol=1e-5
  )
  aa = np.asarray(smpl['pose_axis_angle'])
  assert aa.shape == (24, 3)
  np.testing.assert_allclose(Rotation.from_rotvec(aa).as_matrix(), rotmat, atol=1e-5)
