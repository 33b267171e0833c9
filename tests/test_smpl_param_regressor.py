"""SMPL-parameter regressor: PyTorch parity (train/eval BatchNorm), SVD projection, conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.models import smpl_param_regressor as spr

torch = pytest.importorskip('torch')
from torch_reference import random_init
from torch_reference import smpl_param_regressor as torch_spr

TOLERANCE = 1e-5
BATCH = 16
PREFIX = 'smpl_parameter_regressor.'


def _reference(seed=0):
  """Released-layout state dict (full prefix) of a randomised PyTorch regressor."""
  model = random_init.randomize_(torch_spr.SMPLParameterRegressor(), seed=seed)
  wrapper = torch.nn.Module()
  wrapper.smpl_parameter_regressor = model
  return model, wrapper


def _state(wrapper):
  return {k: v.detach().numpy().copy() for k, v in wrapper.state_dict().items()}


def _vertices(seed=1):
  return np.random.default_rng(seed).normal(0, 0.3, (BATCH, 1723, 3)).astype(np.float32)


def _flax_variables(state):
  target = jax.eval_shape(spr.SMPLParamRegressor().init, jax.random.key(0), jnp.zeros((2, 1723, 3)))
  variables, report = state_dict_lib.to_flax(state, tables.smpl_param_table(flax_prefix=''), target)
  assert not report.ignored
  assert list(report.carried) == [k for k in state if k.endswith('num_batches_tracked')]
  return variables


def test_table_accounts_for_every_key_and_parameter():
  _, wrapper = _reference()
  state = _state(wrapper)
  table = tables.smpl_param_table()
  tables.check_table(table)
  # FastMETRO reference: 37 state-dict keys, 9,734,370 parameters.
  assert len(state) == 37
  assert sorted(tables.torch_keys(table) + tables.expand(table)[1]) == sorted(state)
  params = sum(
      v.size
      for k, v in state.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )
  assert params == 9_734_370
  assert state[PREFIX + 'regressor.0.fc_block.0.weight'].shape == (1024, 5169)
  assert state[PREFIX + 'regressor.3.weight'].shape == (226, 1024)
  flax_paths = {leaf.flax for leaf in tables.expand(table)[0]}
  assert 'smpl_parameter_regressor/regressor_1/fc_block_4/var' in flax_paths
  assert 'smpl_parameter_regressor/regressor_3/kernel' in flax_paths


def test_eval_mode_matches_torch():
  model, wrapper = _reference()
  variables = _flax_variables(_state(wrapper))
  x = _vertices()
  model.eval()
  with torch.no_grad():
    rotmat, betas = model(torch.from_numpy(x))
  out = spr.SMPLParamRegressor().apply(variables, jnp.asarray(x), train=False)
  assert out['pred_rotmat'].shape == (BATCH, 24, 3, 3) and out['pred_betas'].shape == (BATCH, 10)
  np.testing.assert_allclose(out['pred_rotmat'], rotmat.numpy(), atol=TOLERANCE)
  np.testing.assert_allclose(out['pred_betas'], betas.numpy(), atol=TOLERANCE)


def test_train_mode_matches_torch_outputs_and_running_stats():
  model, wrapper = _reference()
  variables = _flax_variables(_state(wrapper))
  x = _vertices(seed=2)
  model.train()
  with torch.no_grad():
    rotmat, betas = model(torch.from_numpy(x))
  out, updates = spr.SMPLParamRegressor().apply(
      variables, jnp.asarray(x), train=True, mutable=['batch_stats']
  )
  np.testing.assert_allclose(out['pred_rotmat'], rotmat.numpy(), atol=TOLERANCE)
  np.testing.assert_allclose(out['pred_betas'], betas.numpy(), atol=TOLERANCE)
  # The running statistics PyTorch moved (momentum 0.1, unbiased variance).
  expected = _flax_variables(_state(wrapper))['batch_stats']
  got = state_dict_lib.flatten(updates['batch_stats'])
  before = state_dict_lib.flatten(variables['batch_stats'])
  for path, value in state_dict_lib.flatten(expected).items():
    assert not np.allclose(value, before[path])  # the step did move them
    np.testing.assert_allclose(got[path], value, atol=TOLERANCE, rtol=TOLERANCE, err_msg=path)


def test_train_mode_needs_two_examples():
  variables = spr.SMPLParamRegressor(hidden=8).init(jax.random.key(0), jnp.zeros((2, 4, 3)))
  with pytest.raises(ValueError, match='at least 2'):
    spr.SMPLParamRegressor(hidden=8).apply(
        variables, jnp.zeros((1, 4, 3)), train=True, mutable=['batch_stats']
    )


def test_input_is_detached():
  variables = spr.SMPLParamRegressor(hidden=8).init(jax.random.key(0), jnp.zeros((3, 5, 3)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 3)), jnp.float32)
  grad = jax.grad(
      lambda v: spr.SMPLParamRegressor(hidden=8).apply(variables, v)['pred_betas'].sum()
  )(x)
  assert not np.any(grad)


def test_svd_rotation_is_a_rotation_and_matches_torch():
  rng = np.random.default_rng(3)
  raw = rng.normal(size=(64, 3, 3)).astype(np.float32)
  raw[:4] = np.diag([1.0, 2.0, -3.0])  # det < 0: U V^T is a reflection
  ours = np.asarray(spr.svd_rotation(jnp.asarray(raw)), np.float64)
  np.testing.assert_allclose(
      ours @ np.swapaxes(ours, 1, 2), np.broadcast_to(np.eye(3), ours.shape), atol=1e-5
  )
  np.testing.assert_allclose(np.linalg.det(ours), 1.0, atol=1e-5)
  # Hand case: diag(1, 2, -3) -> U V^T = diag(1, 1, -1), det -1 -> -diag(1, 1, -1).
  np.testing.assert_allclose(ours[0], np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
  with torch.no_grad():
    ref = torch_spr.svd_rotation(torch.from_numpy(raw)).numpy()
  np.testing.assert_allclose(ours, ref, atol=TOLERANCE)
  assert np.sum(np.linalg.det(raw) < 0) > 10  # both branches of the sign exercised


def test_conversion_round_trip_is_exact():
  _, wrapper = _reference(seed=5)
  state = _state(wrapper)
  variables = _flax_variables(state)
  back = state_dict_lib.to_torch(
      variables, tables.smpl_param_table(flax_prefix=''), num_batches_tracked=7
  )
  assert list(back) == list(state)  # same keys, same (registration) order
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The written file loads strictly into the PyTorch module.
  model, _ = _reference(seed=9)
  model.load_state_dict(
      {k[len(PREFIX) :]: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True
  )


def test_flax_to_torch_to_flax_is_exact():
  variables = spr.SMPLParamRegressor().init(jax.random.key(4), jnp.zeros((2, 1723, 3)))
  variables = jax.tree.map(np.asarray, variables)
  table = tables.smpl_param_table(flax_prefix='')
  state = state_dict_lib.to_torch(variables, table)
  again, _ = state_dict_lib.to_flax(state, table, variables)
  for path, value in state_dict_lib.flatten(variables).items():
    np.testing.assert_array_equal(state_dict_lib.flatten(again)[path], value, err_msg=path)


def test_svd_rotation_gradient_matches_torch():
  rng = np.random.default_rng(6)
  raw = rng.normal(size=(32, 3, 3)).astype(np.float32)
  weight = rng.normal(size=(32, 3, 3)).astype(np.float32)
  ours = jax.grad(lambda m: jnp.sum(spr.svd_rotation(m) * weight))(jnp.asarray(raw))
  x = torch.from_numpy(raw).requires_grad_(True)
  (torch_spr.svd_rotation(x) * torch.from_numpy(weight)).sum().backward()
  assert np.all(np.isfinite(ours))
  np.testing.assert_allclose(ours, x.grad.numpy(), atol=1e-4, rtol=1e-4)
