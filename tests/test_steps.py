"""Train/eval steps: device-count invariance, FSDP, rng, donation, BN groups, optimiser."""

import types

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax import optimizer
from coarsemetro_jax import steps
from coarsemetro_jax.models import fastmetro
from configs import r50

B, S = 8, 32


def tiny_topology():
  """12 -> 6 -> 3 vertices with valid up-sampling gathers."""
  rng = np.random.default_rng(0)
  faces1 = np.int32(
      [[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1], [5, 2, 1], [5, 3, 2], [5, 4, 3], [5, 1, 4]]
  )

  def edges(f):
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    return np.unique(np.sort(e, 1), axis=0).astype(np.int32)

  def up(n_out, n_in):
    w = rng.uniform(0.1, 1, (n_out, 3)).astype(np.float32)
    return rng.integers(0, n_in, (n_out, 3)).astype(np.int32), w / w.sum(1, keepdims=True)

  (i0, w0), (i1, w1) = up(12, 6), up(6, 3)
  faces = (np.int32([[0, 1, 2]]), faces1, np.int32([[0, 1, 2]]))
  return mesh_topology.MeshTopology(
      num_vertices=(12, 6, 3),
      faces=faces,
      edges=tuple(edges(f) for f in faces),
      down_indices=(np.int32([0, 2, 4, 6, 8, 10]), np.int32([1, 3, 5])),
      up_indices=(i0, i1),
      up_weights=(w0, w1),
      coarse_adjacency=np.ones((3, 3), bool),
  )


# A 12-vertex stand-in for body_model (same functions and signatures).
@flax.struct.dataclass
class FakeBody:
  v_template: jax.Array  # [12, 3]
  shapedirs: jax.Array  # [12, 3, 10]
  posedirs: jax.Array  # [12, 3, 72]
  h36m: jax.Array  # [17, 12]


def _fake_forward(body, pose, betas):
  v = (
      body.v_template
      + jnp.einsum('vck,bk->bvc', body.shapedirs, betas)
      + 0.01 * jnp.einsum('vcp,bp->bvc', body.posedirs, pose)
  )
  return v, v[:, :1]


def _fake_h36m_joints(body, vertices):
  return jnp.einsum('jv,bvc->bjc', body.h36m, vertices)


FAKE_BODY_MODEL = types.SimpleNamespace(forward=_fake_forward, h36m_joints=_fake_h36m_joints)


def fake_body(symmetric=False):
  """Random body; `symmetric`: vertices 6..11 mirror 0..5 at x = 0."""
  rng = np.random.default_rng(1)
  h36m = rng.uniform(0, 1, (17, 12)).astype(np.float32)
  template = rng.normal(size=(12, 3)).astype(np.float32) * 0.5
  if symmetric:
    template[:6, 0] = np.abs(template[:6, 0]) + 0.1
    template[6:] = template[:6] * np.float32([-1, 1, 1])
  return FakeBody(
      v_template=template,
      shapedirs=rng.normal(size=(12, 3, 10)).astype(np.float32) * 0.02,
      posedirs=rng.normal(size=(12, 3, 72)).astype(np.float32),
      h36m=h36m / h36m.sum(1, keepdims=True),
  )


@pytest.fixture(autouse=True)
def _fake_body_model(monkeypatch):
  monkeypatch.setattr(steps, 'body_model', FAKE_BODY_MODEL)


def tiny_config():
  config = r50.get_config()
  config.model.backbone = 'resnet'
  config.model.resnet_depths = (1, 1, 1, 1)
  config.model.resnet_width = 4
  config.model.num_heads = 2
  # Two stages (the paper has three) keep the compiles short; the second stage
  # still exercises the width reduction and token up-sampling.
  config.model.stage_dims = (16, 8)
  config.model.stage_ffn_dims = (16, 16)
  config.model.vertex_tokens = (4, 8)
  config.bn_group_size = 4  # two BatchNorm groups (vmap path) per batch of 8
  config.fsdp_min_size = 64
  config.optim.backbone_lr_mult = 0.5
  # AdamW's first step is lr * g / (|g| + eps): with eps 1e-8, gradients near
  # 1e-8 turn float reduction-order noise into a sizeable fraction of lr. A
  # larger eps keeps the update linear in tiny gradients, so params can be
  # compared tightly across device counts.
  config.optim.eps = 1e-3
  return config


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  joints_2d = rng.uniform(-1, 1, (B, 24, 3)).astype(np.float32)
  joints_2d[..., 2] = rng.integers(0, 2, (B, 24))
  joints_3d = rng.normal(size=(B, 24, 4)).astype(np.float32) * 0.3
  joints_3d[..., 3] = 1.0
  return {
      'image': rng.normal(size=(B, S, S, 3)).astype(np.float32),
      'joints_2d': joints_2d,
      'joints_3d': joints_3d,
      'pose': rng.normal(size=(B, 72)).astype(np.float32) * 0.2,
      'betas': rng.normal(size=(B, 10)).astype(np.float32),
      'has_2d_joints': np.ones(B, np.float32),
      'has_3d_joints': np.float32([1, 1, 0, 1, 1, 0, 1, 1]),
      'has_smpl': np.float32([1, 0, 1, 1, 0, 1, 1, 1]),
      'mask': np.ones(B, np.float32),
  }


def setup(config, devices):
  topology = tiny_topology()
  model = models.build_model(config.model, topology)
  device_mesh = steps.make_device_mesh(devices)
  state, state_sharding = steps.create_train_state(
      config, model, jax.random.key(0), device_mesh, (S, S, 3)
  )
  batch_sharding = steps.batch_sharding(device_mesh)
  train_step = steps.make_train_step(
      config, model, fake_body(), topology, state_sharding, batch_sharding
  )
  return state, train_step, batch_sharding, (model, topology, state_sharding)


def run_one_step(config, devices, seed=0):
  state, train_step, batch_sharding, _ = setup(config, devices)
  batch = jax.device_put(make_batch(seed), batch_sharding)
  state, out = train_step(state, batch, jax.random.key(7))
  return jax.device_get(state.params), jax.device_get(out), state


def test_make_device_mesh():
  mesh = steps.make_device_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.shape['data'] == jax.device_count() == 8
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert steps.make_device_mesh(jax.devices()[:1]).shape['data'] == 1


@pytest.fixture(scope='module', autouse=True)
def _fast_compiles():
  """Most XLA optimisations off: these tests check numbers, not speed."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def copy_state(state):
  return jax.tree.map(lambda x: x.copy(), state)


@pytest.fixture(scope='module')
def one_device_reference():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, 'body_model', FAKE_BODY_MODEL)
    params, out, state = run_one_step(tiny_config(), jax.devices()[:1])
  return params, out, jax.device_get(state.opt_state)


@pytest.fixture(scope='module')
def eight_devices():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, 'body_model', FAKE_BODY_MODEL)
    state, train_step, batch_sharding, extra = setup(tiny_config(), None)
  return state, train_step, batch_sharding, extra


def assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=str(path))


def test_train_step_same_on_8_devices_as_on_1(one_device_reference, eight_devices):
  params_1, out_1, _ = one_device_reference
  state0, train_step, batch_sharding, _ = eight_devices
  state = copy_state(state0)
  batch = jax.device_put(make_batch(), batch_sharding)
  new_state, out = train_step(state, batch, jax.random.key(7))
  # Donated: the input state's buffers were handed to the output.
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
  assert int(new_state.step) == 1
  for v in out.values():
    assert v.sharding.is_fully_replicated
  assert np.isfinite(float(out['loss'])) and float(out['loss']) > 0
  np.testing.assert_allclose(out['lr'], 1e-4, rtol=1e-6)
  for k in out_1:
    np.testing.assert_allclose(out[k], out_1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The step moved the params (AdamW's first step is ~lr per coordinate).
  delta = jax.tree.map(
      lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
      jax.device_get(new_state.params),
      jax.device_get(state0.params),
  )
  assert max(jax.tree.leaves(delta)) > 1e-5
  assert_trees_close(jax.device_get(new_state.params), params_1, rtol=1e-5, atol=2e-7)


def test_stop_frozen_gradients_zeroes_exactly_the_frozen_groups():
  config = r50.get_config().optim
  up = fastmetro.UPSAMPLE_MODULE
  params = {
      'backbone': {'w': jnp.float32([1, 2])},
      'head': {'w': jnp.float32([3])},
      up: {'kernel': jnp.float32([4, 5])},
  }

  def loss(p, c):
    p = optimizer.stop_frozen_gradients(p, c)
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

  expected = jax.tree.map(lambda x: 2 * x, params)  # d/dx sum(x^2)
  assert_trees_close(jax.grad(loss)(params, config), expected, 0, 0)
  config.upsample_lr_mult = 0.0
  expected[up]['kernel'] = jnp.zeros(2)
  assert_trees_close(jax.grad(loss)(params, config), expected, 0, 0)
  config.backbone_lr_mult = 0.0
  expected['backbone']['w'] = jnp.zeros(2)
  assert_trees_close(jax.grad(loss)(params, config), expected, 0, 0)
  # Everything but the SMPL-parameter head frozen: only the head moves.
  params[optimizer.SMPL_HEAD_MODULE] = {'w': jnp.float32([6])}
  expected[optimizer.SMPL_HEAD_MODULE] = {'w': jnp.float32([12])}
  config.rest_lr_mult = 0.0
  expected['head']['w'] = jnp.zeros(1)
  assert_trees_close(jax.grad(loss)(params, config), expected, 0, 0)


def test_frozen_groups_are_left_out_of_the_step(one_device_reference):
  """lr multiplier 0: same loss, params unchanged, norm without their gradient."""
  _, out_ref, opt_state_ref = one_device_reference  # backbone x 0.5, upsample x 1
  config = tiny_config()
  config.optim.backbone_lr_mult = 0.0
  config.optim.upsample_lr_mult = 0.0
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(steps, 'body_model', FAKE_BODY_MODEL)
    state, train_step, batch_sharding, _ = setup(config, jax.devices()[:1])
    before = jax.device_get(state.params)
    state, out = train_step(state, jax.device_put(make_batch(), batch_sharding), jax.random.key(7))
  after = jax.device_get(state.params)
  np.testing.assert_allclose(out['loss'], out_ref['loss'], rtol=1e-6)
  for name in ('backbone', fastmetro.UPSAMPLE_MODULE):
    assert_trees_close(after[name], before[name], 0, 0)
  # The reference's first AdamW moments are (1 - b1) * the clipped gradient:
  # the frozen step's norm is the reference's without these groups'.
  frozen_mu = [
      x
      for path, x in jax.tree_util.tree_leaves_with_path(opt_state_ref)
      if '.mu' in jax.tree_util.keystr(path)
      and any(
          f"['{name}']" in jax.tree_util.keystr(path)
          for name in ('backbone', fastmetro.UPSAMPLE_MODULE)
      )
  ]
  num_frozen = len(jax.tree.leaves(before['backbone'])) + 2  # + kernel, bias
  assert len(frozen_mu) == num_frozen
  clip = min(1.0, 0.3 / float(out_ref['grad_norm']))
  frozen_sq = sum(float(np.sum(np.square(m))) for m in frozen_mu) / (0.1 * clip) ** 2
  ref_sq = float(out_ref['grad_norm']) ** 2
  assert 0.01 * ref_sq < frozen_sq < ref_sq  # a share the check can see
  np.testing.assert_allclose(float(out['grad_norm']) ** 2, ref_sq - frozen_sq, rtol=1e-4)


def test_per_step_rng_is_deterministic(eight_devices):
  state0, train_step, batch_sharding, _ = eight_devices
  batch = jax.device_put(make_batch(), batch_sharding)
  rng = jax.random.key(7)
  _, out_a = train_step(copy_state(state0), batch, rng)
  _, out_b = train_step(copy_state(state0), batch, rng)
  assert float(out_a['loss']) == float(out_b['loss'])
  # Another step number folds in other dropout / joint-mask keys.
  _, out_c = train_step(copy_state(state0).replace(step=state0.step + 1), batch, rng)
  assert float(out_c['loss']) != float(out_a['loss'])
  assert steps.step_rngs(rng, 3)['dropout'] is not None
  np.testing.assert_array_equal(
      jax.random.key_data(steps.step_rngs(rng, 3)['dropout']),
      jax.random.key_data(jax.random.split(jax.random.fold_in(rng, 3))[0]),
  )


def test_fsdp_matches_replicated(one_device_reference, eight_devices):
  params_1, out_1, _ = one_device_reference
  state0, _, batch_sharding, (model, topology, _) = eight_devices
  config = tiny_config()
  config.param_sharding = 'fsdp'
  # create_train_state differs only in these shardings (jit out_shardings);
  # re-placing the replicated state saves compiling the init again.
  sharding = steps.state_sharding(state0, batch_sharding.mesh, 'fsdp', config.fsdp_min_size)
  state = jax.device_put(copy_state(state0), sharding)
  sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
  assert sharded, 'fsdp_min_size=64 should shard some params'
  moments = [x for x in jax.tree.leaves(state.opt_state) if not x.sharding.is_fully_replicated]
  assert len(moments) == 2 * len(sharded), 'AdamW mu and nu are sharded like params'
  train_step = steps.make_train_step(config, model, fake_body(), topology, sharding, batch_sharding)
  new_state, out = train_step(
      state, jax.device_put(make_batch(), batch_sharding), jax.random.key(7)
  )
  for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(state0)):
    assert x.sharding.spec == y.sharding.spec or not x.sharding.is_fully_replicated
  for k in out_1:
    np.testing.assert_allclose(out[k], out_1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert_trees_close(jax.device_get(new_state.params), params_1, rtol=1e-5, atol=2e-7)


def test_eval_step_counts_each_real_example_once(eight_devices):
  state, _, batch_sharding, (model, topology, state_sharding) = eight_devices
  eval_step = steps.make_eval_step(
      tiny_config(), model, fake_body(), topology, state_sharding, batch_sharding
  )
  batch = make_batch(1)
  batch['mask'] = np.float32([1, 1, 1, 1, 1, 1, 0, 0])  # 6 real + 2 padding
  collection, pred = eval_step(state, jax.device_put(batch, batch_sharding))
  pred = jax.device_get(pred)
  assert pred['pred_vertices'].shape == (B, 12, 3)
  np.testing.assert_allclose(
      pred['pred_2d_joints'],
      pred['pred_cam'][:, None, :1]
      * (pred['pred_3d_joints'][..., :2] + pred['pred_cam'][:, None, 1:]),
      rtol=1e-5,
  )
  real = batch['mask'] > 0
  sel_3d, sel_smpl = real & (batch['has_3d_joints'] > 0), real & (batch['has_smpl'] > 0)
  assert int(collection.mpjpe.count) == sel_3d.sum()
  assert int(collection.mpve.count) == sel_smpl.sum()
  # NumPy reference from the returned (centred) predictions.
  body = fake_body()
  gt_v = np.asarray(_fake_forward(body, batch['pose'], batch['betas'])[0])
  gt_v = gt_v - np.einsum('jv,bvc->bjc', body.h36m, gt_v)[:, :1]
  j3d = batch['joints_3d']
  gt_j = j3d[:, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 18], :3] - j3d[:, 14:15, :3]
  hip = lambda x: x - (x[:, 2:3] + x[:, 3:4]) / 2
  mpjpe = np.linalg.norm(hip(pred['pred_3d_joints']) - hip(gt_j), axis=-1).mean(-1)
  mpve = np.linalg.norm(pred['pred_vertices'] - gt_v, axis=-1).mean(-1)
  result = collection.compute()
  np.testing.assert_allclose(result['mpjpe'], 1000 * mpjpe[sel_3d].mean(), rtol=1e-4)
  np.testing.assert_allclose(result['mpve'], 1000 * mpve[sel_smpl].mean(), rtol=1e-4)
  assert np.isfinite(float(result['pa_mpjpe'])) and float(result['pa_mpjpe']) > 0


def test_eval_flip_averages_with_the_mirrored_prediction(eight_devices):
  state, _, batch_sharding, (model, topology, state_sharding) = eight_devices
  config = tiny_config()
  config.eval_flip = True
  body = fake_body(symmetric=True)
  eval_step = steps.make_eval_step(config, model, body, topology, state_sharding, batch_sharding)
  batch = make_batch(2)
  _, pred = eval_step(state, jax.device_put(batch, batch_sharding))
  pred = jax.device_get(pred)
  # Reference: the plain and mirrored-image outputs, mapped back by hand
  # (vertex i <-> i + 6, x negated, camera tx negated), averaged, centred.
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  apply = lambda x: jax.device_get(model.apply(variables, x, train=False))
  plain, mirrored = apply(batch['image']), apply(batch['image'][:, :, ::-1])
  perm = np.r_[6:12, 0:6]
  mirror_v = mirrored['pred_3d_vertices_fine'][:, perm] * np.float32([-1, 1, 1])
  vertices = 0.5 * (plain['pred_3d_vertices_fine'] + mirror_v)
  pelvis = np.einsum('jv,bvc->bjc', body.h36m, vertices)[:, joint_tables.H36M_PELVIS]
  np.testing.assert_allclose(
      pred['pred_vertices'], vertices - pelvis[:, None], rtol=1e-4, atol=1e-6
  )
  cam = 0.5 * (plain['pred_cam'] + mirrored['pred_cam'] * np.float32([1, -1, 1]))
  np.testing.assert_allclose(pred['pred_cam'], cam, rtol=1e-4, atol=1e-6)
  # The mirrored image's prediction really differs (the average is not a no-op).
  assert np.abs(mirror_v - plain['pred_3d_vertices_fine']).max() > 1e-4


def test_predictions_centre_at_the_regressed_pelvis_or_pass_through():
  rng = np.random.default_rng(0)
  outputs = {
      'pred_cam': np.float32([[0.9, 0.1, -0.2], [1.1, -0.3, 0.05]]),
      'pred_3d_joints': rng.normal(size=(2, 14, 3)).astype(np.float32),
      'pred_3d_vertices_fine': rng.normal(size=(2, 12, 3)).astype(np.float32),
      'pred_3d_vertices_intermediate': rng.normal(size=(2, 6, 3)).astype(np.float32),
      'pred_3d_vertices_coarse': rng.normal(size=(2, 3, 3)).astype(np.float32),
  }
  regressor = rng.random((17, 12)).astype(np.float32)
  regressor /= regressor.sum(1, keepdims=True)
  got = steps.predictions(outputs, lambda v: jnp.einsum('jv,bvc->bjc', regressor, v))
  # NumPy reference: the mesh and its J14 minus the mesh's H36M pelvis (J17 index 0).
  j17 = np.einsum('jv,bvc->bjc', regressor, outputs['pred_3d_vertices_fine'])
  pelvis = j17[:, :1]
  joints = j17[:, list(joint_tables.H36M_J17_TO_J14)] - pelvis
  cam = outputs['pred_cam']
  np.testing.assert_allclose(
      got['pred_vertices'], outputs['pred_3d_vertices_fine'] - pelvis, atol=1e-6
  )
  np.testing.assert_allclose(got['pred_3d_joints'], joints, atol=1e-6)
  np.testing.assert_array_equal(got['pred_cam'], cam)
  np.testing.assert_allclose(
      got['pred_2d_joints'], cam[:, None, :1] * (joints[..., :2] + cam[:, None, 1:]), atol=1e-6
  )
  # Without a regressor: the raw mesh and the joint tokens, projected.
  raw = steps.predictions(outputs)
  np.testing.assert_array_equal(raw['pred_vertices'], outputs['pred_3d_vertices_fine'])
  np.testing.assert_array_equal(raw['pred_3d_joints'], outputs['pred_3d_joints'])
  tokens = outputs['pred_3d_joints']
  np.testing.assert_allclose(
      raw['pred_2d_joints'], cam[:, None, :1] * (tokens[..., :2] + cam[:, None, 1:]), atol=1e-6
  )
  assert all(v.dtype == jnp.float32 for v in (*got.values(), *raw.values()))


# ----------------------------------------------------------------------------
# BatchNorm groups, optimiser, sharding rules (no model compile).


class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4, name='dense')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(x)
    return {'y': nn.Dropout(0.5, deterministic=not train)(x)}


def test_grouped_batchnorm_equals_separate_groups():
  model = _BNNet()
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32) * [1, 5, 9]
  variables = model.init(jax.random.key(0), x)
  rngs = {'dropout': jax.random.key(1), 'joint_mask': jax.random.key(2)}
  out, stats = steps.apply_train(model, variables, x, rngs, bn_group_size=4)
  group_rngs = {k: jax.random.split(v, 2) for k, v in rngs.items()}
  ref_out, ref_stats = [], []
  for g in range(2):
    o, s = model.apply(
        variables,
        x[4 * g : 4 * g + 4],
        train=True,
        rngs={k: v[g] for k, v in group_rngs.items()},
        mutable=['batch_stats'],
    )
    ref_out.append(o['y'])
    ref_stats.append(s['batch_stats'])
  np.testing.assert_allclose(out['y'], np.concatenate(ref_out), rtol=1e-5, atol=1e-6)
  assert_trees_close(
      stats, jax.tree.map(lambda a, b: (a + b) / 2, *ref_stats), rtol=1e-5, atol=1e-6
  )
  # Group size 0 (or >= batch) is the whole batch = SyncBN under jit.
  out_all, stats_all = steps.apply_train(model, variables, x, rngs, bn_group_size=0)
  o, s = model.apply(variables, x, train=True, rngs=rngs, mutable=['batch_stats'])
  np.testing.assert_allclose(out_all['y'], o['y'])
  assert_trees_close(stats_all, s['batch_stats'], rtol=0, atol=0)
  with pytest.raises(ValueError, match='bn_group_size'):
    steps.apply_train(model, variables, x[:6], rngs, bn_group_size=4)


def test_optimizer_clipping_group_multipliers_and_step_decay():
  config = r50.get_config().optim
  config.backbone_lr_mult = 0.1
  config.upsample_lr_mult = 0.5
  up = fastmetro.UPSAMPLE_MODULE
  params = {'backbone': {'w': jnp.ones(3)}, 'head': {'w': jnp.ones(2)}, up: {'kernel': jnp.ones(1)}}
  grads = {
      'backbone': {'w': jnp.float32([3, 0, 4])},
      'head': {'w': jnp.float32([0, 0])},
      up: {'kernel': jnp.float32([0])},
  }
  tx, lr_fn = optimizer.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Reference: clip to norm 0.3, then plain AdamW with the group's lr (the
  # zero-gradient groups still get the decoupled weight decay, lr * 1e-4).
  clipped = jax.tree.map(lambda g: g * 0.3 / 5.0, grads)
  for name, lr in (('backbone', 1e-5), ('head', 1e-4), (up, 5e-5)):
    ref = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
    ref_updates, _ = ref.update(clipped[name], ref.init(params[name]), params[name])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates[name], ref_updates
    )
  assert float(lr_fn(10**6)) == pytest.approx(1e-4)  # constant by default
  config.lr_drop_epochs = 2
  with pytest.raises(ValueError, match='steps_per_epoch'):
    optimizer.make_optimizer(config)
  _, lr_fn = optimizer.make_optimizer(config, steps_per_epoch=10)
  np.testing.assert_allclose(
      [lr_fn(s) for s in (0, 19, 20, 39, 40)], [1e-4, 1e-4, 1e-5, 1e-5, 1e-6], rtol=1e-5
  )


def test_grad_clip_norm_zero_turns_clipping_off():
  config = r50.get_config().optim
  config.grad_clip_norm = 0.0
  params = {'w': jnp.ones(2)}
  grads = {'w': jnp.float32([30.0, -40.0])}  # norm 50, far above 0.3
  tx, _ = optimizer.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  ref = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
  ref_updates, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(updates['w'], ref_updates['w'], rtol=1e-6)
  # Adam's first step is ~lr * sign(g) whatever the norm, so check the moments:
  # unclipped, the first moment is 0.1 * g.
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  np.testing.assert_allclose(state[0].mu['w'], [3.0, -4.0], rtol=1e-6)
  config.grad_clip_norm = -1.0
  with pytest.raises(ValueError, match='grad_clip_norm'):
    optimizer.make_optimizer(config)


def test_cosine_schedule_with_warmup():
  config = r50.get_config()
  config.optim.lr = 1e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_steps = 10
  config.num_train_steps = 110
  # Hand-computed: linear 0 -> lr over 10 steps, then lr/2 (1 + cos(pi t/100)).
  _, lr_fn = optimizer.make_optimizer(config.optim, total_steps=optimizer.total_train_steps(config))
  np.testing.assert_allclose(
      [float(lr_fn(s)) for s in (0, 5, 10, 35, 60, 110)],
      [0.0, 5e-4, 1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 5e-4, 0.0],
      atol=1e-9,
  )
  # Over num_epochs when num_train_steps is unset.
  config.num_train_steps = -1
  config.num_epochs = 2
  assert optimizer.total_train_steps(config, steps_per_epoch=55) == 110
  with pytest.raises(ValueError, match='total steps'):
    optimizer.make_optimizer(config.optim)
  config.optim.schedule = 'exponential'
  with pytest.raises(ValueError, match="'step', 'cosine' or 'linear'"):
    optimizer.make_optimizer(config.optim, total_steps=100)


def test_linear_schedule_with_warmup():
  config = r50.get_config()
  config.optim.lr = 1e-3
  config.optim.schedule = 'linear'
  config.optim.warmup_steps = 10
  # Hand-computed: linear 0 -> lr over 10 steps, then lr (1 - t/100) to 0.
  _, lr_fn = optimizer.make_optimizer(config.optim, total_steps=110)
  np.testing.assert_allclose(
      [float(lr_fn(s)) for s in (0, 5, 10, 35, 60, 109, 110, 200)],
      [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 1e-5, 0.0, 0.0],
      atol=1e-9,
  )
  with pytest.raises(ValueError, match="'linear' needs the run's total steps"):
    optimizer.make_optimizer(config.optim)


def test_fsdp_spec_rule():
  assert steps.fsdp_spec((256, 512), 8, 1000) == jax.P(None, 'data')
  assert steps.fsdp_spec((7, 7, 64, 3), 8, 1000) == jax.P(None, None, 'data', None)
  assert steps.fsdp_spec((10, 3), 8, 1) == jax.P()  # nothing divisible
  assert steps.fsdp_spec((64,), 8, 1000) == jax.P()  # too small
  assert steps.fsdp_spec((), 8, 0) == jax.P()
  with pytest.raises(ValueError, match='param_sharding'):
    steps.state_sharding({}, steps.make_device_mesh(), 'zero3')
