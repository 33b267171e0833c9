"""Dropout whose mask costs a quarter of the random bits of `flax.linen.Dropout`'s.

nn.Dropout draws one uniform float per element through `jax.random.bernoulli`;
with partitionable threefry (sharding-independent draws) that is one threefry
2x32 evaluation per element, which on XLA:CPU made the attention-weight dropout
of the decoder ([B, H, L, L], L = 445 tokens for FastMETRO) a tenth of the
training step. Here one evaluation gives 64 bits, read as four 16-bit uniforms:

  counter c = the flat index of [..., ceil(L / 4)], threefry2x32(key, (c, 0))
  -> two 32-bit words -> four 16-bit values u; keep where u < round(p * 2^16).

The keep probability is p to within 2^-17 (0.9 becomes 0.899994); kept values
are scaled by 1 / p as in nn.Dropout. The counters are an iota over the global
shape, as in partitionable threefry, so the mask does not depend on how the
array is sharded. Keys of other PRNG implementations use `jax.random.bernoulli`.
"""

import math

import flax.linen as nn
import jax
import jax.extend.random
import jax.numpy as jnp

_BITS = 16


def keep_mask(key, shape, keep_prob):
  """Bernoulli(keep_prob) mask of `shape` (bool), from a threefry `key`."""
  if jax.random.key_impl(key) is not jax.extend.random.threefry_prng_impl:
    return jax.random.bernoulli(key, keep_prob, shape)
  *lead, last = shape
  per_eval = 64 // _BITS
  counters_shape = (*lead, -(-last // per_eval))
  counters = jax.lax.iota(jnp.uint32, math.prod(counters_shape)).reshape(counters_shape)
  words = jax.extend.random.threefry_2x32(
      jax.random.key_data(key), jnp.stack([counters, jnp.zeros_like(counters)])
  )  # [2, *lead, ceil(last / 4)] uint32
  uniforms = jax.lax.bitcast_convert_type(jnp.moveaxis(words, 0, -1), jnp.uint16)  # [..., 2, 2]
  uniforms = uniforms.reshape(*lead, -1)[..., :last]  # [*shape] uint16
  threshold = round(keep_prob * 2**_BITS)
  if threshold >= 2**_BITS:
    return jnp.ones(shape, bool)
  return uniforms < jnp.uint16(threshold)


class Dropout(nn.Module):
  """nn.Dropout(rate) with `keep_mask`'s cheaper mask; the 'dropout' rng stream."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    keep = keep_mask(self.make_rng('dropout'), x.shape, keep_prob)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))
