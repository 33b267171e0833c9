"""Dropout: Flax's nn.Dropout, with its mask bits computed in one fused pass on XLA:CPU.

Same masks, bit for bit, as nn.Dropout (and so the same training run): the
mask is `jax.random.bernoulli(key, 1 - rate, shape)` from the module's
`make_rng('dropout')` key. With JAX's default threefry keys (partitionable,
as jax 0.10 has it) that is, per element at row-major index i,

  bits = x1 ^ x2,  (x1, x2) = threefry2x32(key, (0, i)),
  keep = (bits >> 9) / 2^23 < float32(1 - rate),

the uniform draw of `jax.random.uniform` being its 23 high bits.

Why: JAX lowers threefry for XLA:CPU as a loop of 5 iterations over whole
arrays (to keep compile times short), so every iteration writes two u32
arrays of the mask's size to memory and reads them back. For the
[B, heads, 445, 445] attention weights of FastMETRO's decoder that made the
dropout masks about an eighth of the training step's CPU time. Written out as
plain elementwise operations, XLA fuses the 20 rounds, the comparison and the
select into one pass: about 6x faster for those masks, same values. Lowered for
TPU and GPU, and for keys or settings this does not cover, it is nn.Dropout's
own `jax.random.bernoulli`.
"""

import fractions
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), as JAX uses it.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotate_left(x, r):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 hash of counters (x1, x2) [u32 arrays] under key (k1, k2) [u32 scalars]."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(_KEY_PARITY))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, r)
    x1 = x1 + ks[(block + 1) % 3]
    x2 = x2 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x1, x2


def row_major_index(shape):
  """u32 [*shape]: each element's row-major index (arrays under 2^32 elements)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return index


def random_bits(key, shape):
  """`jax.random.bits(key, shape)` (u32) for a partitionable threefry key, as elementwise ops."""
  k1, k2 = jax.random.key_data(key)
  return jnp.bitwise_xor(
      *threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), row_major_index(shape))
  )


def keep_threshold(keep_prob):
  """T with `uniform < float32(keep_prob)` <=> `bits >> 9 < T` (uniform = (bits >> 9) / 2^23)."""
  return math.ceil(fractions.Fraction(float(np.float32(keep_prob))) * 2**23)


def fused_bits_apply(key, shape):
  """Whether `random_bits` reproduces jax.random.bits for this key and shape."""
  return (
      str(jax.random.key_impl(key)) == 'threefry2x32'
      and jax.config.jax_threefry_partitionable
      and all(isinstance(n, int) for n in shape)
      and math.prod(shape) < 2**32
  )


def fused_keep_mask(key, shape, keep_prob):
  """`jax.random.bernoulli(key, keep_prob, shape)` as elementwise ops (`fused_bits_apply`)."""
  bits = random_bits(key, shape) >> np.uint32(9)
  return bits < np.uint32(keep_threshold(keep_prob))


def keep_mask(key, shape, keep_prob):
  """`jax.random.bernoulli(key, keep_prob, shape)`; `fused_keep_mask` when lowered for XLA:CPU."""
  bernoulli = lambda key: jax.random.bernoulli(key, p=keep_prob, shape=shape)
  if not fused_bits_apply(key, shape):
    return bernoulli(key)
  return lax.platform_dependent(
      key, cpu=lambda key: fused_keep_mask(key, shape, keep_prob), default=bernoulli
  )


def drop(inputs, mask, keep_prob):
  """nn.Dropout's value: kept elements scaled by 1 / keep_prob, the others zero."""
  return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class Dropout(nn.Module):
  """nn.Dropout(rate) without `broadcast_dims`: the same masks and values."""

  rate: float

  @nn.compact
  def __call__(self, inputs, deterministic):
    # inputs [...] -> [...], zeroed with probability `rate`, kept ones scaled by 1 / (1 - rate).
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    key = self.make_rng('dropout')
    return drop(inputs, keep_mask(key, inputs.shape, keep_prob), keep_prob)
