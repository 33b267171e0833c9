"""models/dropout.py: the 16-bit threefry keep mask and the Dropout module."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from coarsemetro_jax.models import dropout


@pytest.mark.parametrize('keep_prob', [0.9, 0.5, 0.25])
def test_keep_mask_frequency_per_lane(keep_prob):
  # 4 x 1000 x 445 draws: the frequency within 5 standard deviations of
  # keep_prob overall and for each of the four 16-bit lanes of a threefry
  # evaluation (element index mod 4), and no correlation between lanes.
  shape = (4, 1000, 445)
  mask = np.asarray(dropout.keep_mask(jax.random.key(3), shape, keep_prob))
  assert mask.shape == shape and mask.dtype == bool
  n = mask.size
  assert abs(mask.mean() - keep_prob) < 5 * np.sqrt(keep_prob * (1 - keep_prob) / n)
  lanes = mask[..., :444].reshape(4, 1000, 111, 4)
  per_lane = lanes.mean((0, 1, 2))
  sd = np.sqrt(keep_prob * (1 - keep_prob) / lanes[..., 0].size)
  np.testing.assert_array_less(np.abs(per_lane - keep_prob), 5 * sd)
  both = (lanes[..., 0] & lanes[..., 1]).mean()
  assert abs(both - keep_prob**2) < 5 * np.sqrt(
      keep_prob**2 * (1 - keep_prob**2) / lanes[..., 0].size
  )


def test_keep_mask_depends_on_the_key_and_is_deterministic():
  a = dropout.keep_mask(jax.random.key(0), (8, 37), 0.5)
  np.testing.assert_array_equal(a, dropout.keep_mask(jax.random.key(0), (8, 37), 0.5))
  assert not np.array_equal(a, dropout.keep_mask(jax.random.key(1), (8, 37), 0.5))
  assert np.all(dropout.keep_mask(jax.random.key(0), (3, 5), 1.0))


def test_keep_mask_other_prng_impl_uses_bernoulli():
  key = jax.random.key(0, impl='rbg')
  np.testing.assert_array_equal(
      dropout.keep_mask(key, (6, 7), 0.9), jax.random.bernoulli(key, 0.9, (6, 7))
  )


def test_keep_mask_is_independent_of_sharding():
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip('needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
  device_mesh = Mesh(devices, ('data',))
  shape = (devices.size * 2, 3, 45)
  fn = lambda key: dropout.keep_mask(key, shape, 0.9)
  sharded = jax.jit(fn, out_shardings=NamedSharding(device_mesh, P('data')))(jax.random.key(5))
  np.testing.assert_array_equal(sharded, jax.jit(fn)(jax.random.key(5)))


def test_dropout_module_scales_kept_values_and_passes_gradients():
  x = jnp.arange(1.0, 2001.0).reshape(4, 500)
  module = dropout.Dropout(0.1)
  rngs = {'dropout': jax.random.key(2)}
  y = module.apply({}, x, deterministic=False, rngs=rngs)
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.9, rtol=1e-6)
  assert 0.85 < kept.mean() < 0.95
  grad = jax.grad(lambda x: module.apply({}, x, deterministic=False, rngs=rngs).sum())(x)
  np.testing.assert_allclose(grad, kept / 0.9, rtol=1e-6)
  np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, deterministic=False), x)
