"""Per-array checksums of a pytree, computed where the arrays live.

Orbax (0.12) verifies nothing about array data on restore: zarr3's crc32c
covers only a shard's index, and zstd frames carry no content checksum, so a
same-size overwrite of a data file restores without an error. Checkpoints of
this project therefore store one checksum per array, taken on device at save
time and compared after a restore.

The checksum of an array is

  sum_i mix(w_i) * (2 i + 1)   (mod 2**32)

over its bytes read as words w_i in C order: 32-bit words; 16- and 8-bit
types give one word per element (widened); 64-bit types two words per
element. `mix` is MurmurHash3's 32-bit finaliser, a bijection of uint32: a
change of any one word changes mix(w_i) and, the weight being odd (invertible
mod 2**32), the sum. The mix also spreads each bit over the whole word, so that
several changed words (e.g. two flipped sign bits, 2**31 each) cancel only
by a 1-in-2**32 coincidence. The sum is associative, so the result does not
depend on how an array is sharded: a FSDP-sharded or multi-host array is
checksummed where it lives, and only a uint32 per array comes back to the host.
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


class ChecksumError(ValueError):
  """Arrays do not match the checksums stored with them."""


def path_name(path):
  """'params/backbone/conv1/kernel' for a jax key path (dict, attribute or index keys)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _words(x):
  """The array's bytes as uint32 words: x's shape, plus a trailing 2 for 64-bit types."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  itemsize = np.dtype(x.dtype).itemsize
  if itemsize == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if itemsize in (1, 2):
    return lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * itemsize}')).astype(jnp.uint32)
  if itemsize == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  raise TypeError(f'no checksum for dtype {x.dtype}')


def _mix(h):
  """MurmurHash3 fmix32 (a bijection of uint32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def array_checksum(x):
  """uint32 checksum of one array (traceable; see the module docstring)."""
  words = _words(jnp.asarray(x))
  # The flat C-order index of each word, from one iota per axis: no reshape,
  # so a sharded array stays sharded (a flatten could make XLA gather it).
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.sum(_mix(words) * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _all_checksums(leaves):
  return [array_checksum(x) for x in leaves]


def tree_checksums(tree):
  """{path_name: checksum (int)} of every array leaf of `tree`, in one jitted call.

  Leaves may be jax.Arrays of any sharding (also spanning several hosts) or
  numpy arrays; scalars are arrays too. The results are replicated scalars, so
  every process gets the same dict.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [path_name(p) for p, _ in flat]
  values = jax.device_get(_all_checksums([x for _, x in flat]))  # one transfer
  return {n: int(v) for n, v in zip(names, values)}


def mismatches(tree, expected):
  """Names of `tree`'s leaves whose checksum differs from `expected` (or is not there)."""
  actual = tree_checksums(tree)
  return [n for n, c in actual.items() if expected.get(n) != c]


def verify(tree, expected, what):
  """Raises ChecksumError naming `what` and the first differing arrays."""
  bad = mismatches(tree, expected)
  if bad:
    shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
    raise ChecksumError(
        f'{what}: {len(bad)} of {len(jax.tree.leaves(tree))} arrays do not '
        f'match their saved checksums ({shown})'
    )
