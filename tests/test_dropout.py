"""models/dropout.py: the fused mask equals jax.random's bits and nn.Dropout's values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax.models import dropout


@pytest.mark.parametrize('shape', [(7,), (3, 5), (2, 7, 11), (4, 3, 45, 46), (1,)])
def test_random_bits_equal_jax_random_bits(shape):
  for seed in (0, 7, 123456789):
    key = jax.random.key(seed)
    got = jax.jit(dropout.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(got, jax.random.bits(key, shape))


def test_threefry_known_answer():
  # Random123's known-answer vectors for threefry2x32 with 20 rounds.
  cases = [
      ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
      ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
      ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
  ]
  for (k1, k2), (x1, x2), expected in cases:
    u = lambda v: jnp.asarray(v, jnp.uint32)
    got = dropout.threefry2x32(u(k1), u(k2), u([x1]), u([x2]))
    assert (int(got[0][0]), int(got[1][0])) == expected


def test_keep_threshold_matches_uniform_comparison():
  # Every 23-bit mantissa around the threshold, compared as jax.random.uniform does.
  for keep in (0.9, 0.5, 0.7, 1 / 3):
    t = dropout.keep_threshold(keep)
    m = np.arange(t - 3, t + 3, dtype=np.uint32)
    u = (m | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)  # [1, 2) - 1
    np.testing.assert_array_equal(u < np.float32(keep), m < t)


class _Net(nn.Module):
  rate: float
  flax_dropout: bool

  @nn.compact
  def __call__(self, x, train):
    cls = nn.Dropout if self.flax_dropout else dropout.Dropout
    y = cls(self.rate, name='drop_a')(x, deterministic=not train)
    return cls(self.rate)(jnp.tanh(y), deterministic=not train)  # auto-named


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.0, 1.0])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_flax_dropout(rate, dtype):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 33, 29)), dtype)
  rngs = {'dropout': jax.random.key(5)}

  def run(flax_dropout, train):
    net = _Net(rate, flax_dropout)
    f = lambda x: net.apply({}, x, train, rngs=rngs)
    return jax.jit(f)(x), jax.jit(jax.grad(lambda x: (f(x).astype(jnp.float32) ** 2).sum()))(x)

  for train in (True, False):
    got, got_grad = run(False, train)
    want, want_grad = run(True, train)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(
        np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32)
    )
  if 0 < rate < 1:
    dropped = float((run(False, True)[0] == 0).mean())  # by either of the two layers
    assert abs(dropped - (1 - (1 - rate) ** 2)) < 0.01


def test_equal_under_vmap_and_sharding():
  """Grouped BatchNorm vmaps the model over split keys; the train step shards the batch."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 6, 40)), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 8)

  def apply(flax_dropout):
    net = _Net(0.3, flax_dropout)
    return jax.jit(jax.vmap(lambda k, x: net.apply({}, x, True, rngs={'dropout': k})))(keys, x)

  np.testing.assert_array_equal(apply(False), apply(True))
  devices = np.array(jax.devices()[:8])
  if len(devices) < 2:
    pytest.skip('needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
  device_mesh = jax.sharding.Mesh(devices[: len(devices) // 2 * 2], ('data',))
  sharding = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec('data'))
  net = _Net(0.3, False)
  f = jax.jit(lambda x: net.apply({}, x, True, rngs={'dropout': jax.random.key(4)}))
  np.testing.assert_array_equal(f(jax.device_put(x, sharding)), f(x))
  np.testing.assert_array_equal(
      f(x),
      jax.jit(lambda x: _Net(0.3, True).apply({}, x, True, rngs={'dropout': jax.random.key(4)}))(x),
  )


def test_other_key_kinds_fall_back_to_jax_random():
  key = jax.random.key(0, impl='rbg')
  assert not dropout.fused_bits_apply(key, (4, 4))
  assert dropout.fused_bits_apply(jax.random.key(0), (4, 4))
  x = jnp.ones((64, 64))
  got = _Net(0.5, False).apply({}, x, True, rngs={'dropout': key})
  want = _Net(0.5, True).apply({}, x, True, rngs={'dropout': key})
  np.testing.assert_array_equal(got, want)
