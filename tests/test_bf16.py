"""bf16 compute (config.model.compute_dtype='bfloat16') against float32, configs/tiny.py.

Parameters, AdamW moments, BatchNorm statistics, model outputs, losses and
metrics must stay float32; convolutions and matmuls run in bf16.

Tolerances. bf16 keeps 8 significant bits (relative rounding 2**-9), so the
loss must agree within 0.5 %. The gradient of the randomly initialised tiny
model on noise images is ill-conditioned: in float32, merely rounding the input
image to bf16 moves it by some 10-20 % (relative L2). The bf16 gradient must
stay within three times that distance of the float32 one, and point the same
way (cosine similarity >= 0.9).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import body_model
from coarsemetro_jax import losses
from coarsemetro_jax import models
from coarsemetro_jax import steps
from configs import tiny

B = 8
LOSS_RTOL = 0.005
GRAD_ERROR_VS_INPUT_ROUNDING = 3.0
GRAD_COSINE = 0.9


def tiny_config(dtype):
  config = tiny.get_config()
  config.model.compute_dtype = dtype
  return config


def make_batch(body, size, seed=0):
  """A batch of the data_pipelines contract with labels from the body model."""
  rng = np.random.default_rng(seed)
  pose = (rng.normal(size=(B, 72)) * 0.2).astype(np.float32)
  betas = rng.normal(size=(B, 10)).astype(np.float32)
  _, joints = body_model.forward(body, pose, betas)  # SMPL's 24 joints stand in for J24
  joints = np.asarray(joints)
  joints_3d = np.concatenate([joints - joints[:, 14:15], np.ones((B, 24, 1))], -1)
  joints_2d = np.concatenate([joints[..., :2] * 2, np.ones((B, 24, 1))], -1)
  return {
      'image': rng.normal(size=(B, size, size, 3)).astype(np.float32),
      'joints_2d': joints_2d.astype(np.float32),
      'joints_3d': joints_3d.astype(np.float32),
      'pose': pose,
      'betas': betas,
      'has_2d_joints': np.ones(B, np.float32),
      'has_3d_joints': np.float32([1, 1, 0, 1, 1, 1, 0, 1]),
      'has_smpl': np.float32([1, 0, 1, 1, 1, 0, 1, 1]),
      'mask': np.ones(B, np.float32),
  }


@pytest.fixture(scope='module')
def setup(topology):
  """Shared f32 initial state (params are f32 for both dtypes), body and batch."""
  body = body_model.load_body_model()
  config = tiny_config('float32')
  size = config.data.image_size
  device_mesh = steps.make_device_mesh(jax.devices()[:2])
  model = models.build_model(config.model, topology)
  state, sharding = steps.create_train_state(
      config, model, jax.random.key(0), device_mesh, (size, size, 3)
  )
  return body, state, sharding, make_batch(body, size), device_mesh


def loss_and_grads(config, topology, body, batch_stats):
  """The train step's loss (steps.make_train_step) and gradient: fn(params, batch)."""
  model = models.build_model(config.model, topology)
  rngs = steps.step_rngs(jax.random.key(7), 0)
  regress = functools.partial(body_model.h36m_joints, body)

  def loss_fn(params, batch):
    gt_vertices, _ = body_model.forward(body, batch['pose'], batch['betas'])
    outputs, _ = steps.apply_train(
        model,
        {'params': params, 'batch_stats': batch_stats},
        batch['image'],
        rngs,
        config.bn_group_size,
    )
    return losses.compute_loss(outputs, batch, gt_vertices, regress, topology, config.loss)[0]

  return jax.jit(jax.value_and_grad(loss_fn))


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_bf16_loss_and_gradients_match_f32(setup, topology):
  body, state, _, batch, _ = setup
  f32 = loss_and_grads(tiny_config('float32'), topology, body, state.batch_stats)
  bf16 = loss_and_grads(tiny_config('bfloat16'), topology, body, state.batch_stats)
  loss32, grads32 = f32(state.params, batch)
  loss16, grads16 = bf16(state.params, batch)
  rounded = dict(batch, image=batch['image'].astype(jnp.bfloat16).astype(np.float32))
  _, grads_rounded = f32(state.params, rounded)
  assert loss16.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
  g32, g16 = flat(grads32), flat(grads16)
  error = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
  rounding = np.linalg.norm(flat(grads_rounded) - g32) / np.linalg.norm(g32)
  cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
  print(
      f'loss f32 {loss32:.4f} bf16 {loss16:.4f}; gradient relative error {error:.3f}, '
      f'f32 with the image rounded to bf16 {rounding:.3f}, cosine {cosine:.4f}'
  )
  # bf16 rounding does change the gradient: the bf16 path is really taken.
  assert error > 0
  assert error <= GRAD_ERROR_VS_INPUT_ROUNDING * rounding
  assert cosine >= GRAD_COSINE


def test_bf16_model_computes_in_bf16(setup, topology):
  """Convolutions and matmuls take bf16 operands; the outputs are f32."""
  _, state, _, batch, _ = setup
  model = models.build_model(tiny_config('bfloat16').model, topology)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, batch['image'])
  heavy = [
      e for e in jaxpr.jaxpr.eqns if e.primitive.name in ('dot_general', 'conv_general_dilated')
  ]
  operand_dtypes = {v.aval.dtype for e in heavy for v in e.invars}
  assert heavy and operand_dtypes == {jnp.dtype(jnp.bfloat16)}
  outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, batch['image'])
  assert all(o.dtype == jnp.float32 for o in jax.tree.leaves(outputs))


def test_bf16_train_step_keeps_state_and_metrics_in_f32(setup, topology):
  body, state, sharding, batch, device_mesh = setup
  config = tiny_config('bfloat16')
  model = models.build_model(config.model, topology)
  batch_sharding = steps.batch_sharding(device_mesh)
  train_step = steps.make_train_step(config, model, body, topology, sharding, batch_sharding)
  state = jax.tree.map(lambda x: x.copy(), state)  # the step donates it
  old_stats = jax.device_get(state.batch_stats)
  new_state, out = train_step(state, jax.device_put(batch, batch_sharding), jax.random.key(7))
  for name in ('params', 'opt_state', 'batch_stats'):
    leaves = [
        x
        for x in jax.tree.leaves(getattr(new_state, name))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert leaves and all(x.dtype == jnp.float32 for x in leaves), name
  assert all(v.dtype == jnp.float32 and np.isfinite(v) for v in out.values())
  # The statistics were updated from the bf16 activations, in f32.
  changed = jax.tree.map(
      lambda a, b: not np.array_equal(a, b), old_stats, jax.device_get(new_state.batch_stats)
  )
  assert all(jax.tree.leaves(changed))
  # The step's loss is the function above at its first step (2 devices vs 1:
  # only reduction orders differ).
  loss16, _ = loss_and_grads(config, topology, body, setup[1].batch_stats)(setup[1].params, batch)
  np.testing.assert_allclose(out['loss'], loss16, rtol=1e-3)
