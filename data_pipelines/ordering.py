"""The global order of training rows, and each process's share of it (NumPy).

The order is a function of the dataset size, the seed and the global batch
size only, so the global batch at step t holds the same rows in the same order
whatever the number of processes (the idea of grain's index samplers: the
record at global position g is f(g), so any process can compute any part of
the stream without reading the rest):

  position g = epoch * num_rows + i   ->   row = epoch_order(epoch)[i]
  global batch t = positions [t * B, (t + 1) * B)

`epoch_order` is one permutation of all rows per epoch, drawn from
`np.random.default_rng((seed, epoch))` (the identity without shuffling).
Epochs are concatenated: a batch may straddle two epochs (its last rows from
epoch e, its first from e + 1) and no row is ever dropped, as in a single
process's `shuffle -> repeat -> batch` stream. (`steps_per_epoch = num_rows // B`
of the learning-rate schedule is therefore slightly shorter than a data epoch
when B does not divide num_rows.) An example's augmentation is keyed by
(seed, epoch, row) with epoch = g // num_rows, so it too is host-independent.

Each process reads only its own rows of every global batch: the slots
`local_rows` (sorted indices into [0, B)) that its devices hold, in increasing
order, which is the order in which `jax.make_array_from_process_local_data`
places a process's local batch into the global one (`process_rows` computes
them from the batch sharding; for a mesh whose processes own contiguous device
blocks in process order they are `contiguous_rows`).
Resuming at step t starts at position t * B, computed directly, never by
iterating over the skipped positions.
"""

import numpy as np


def epoch_order(num_rows, seed, epoch, shuffle=True):
  """The rows of one epoch in training order: [num_rows] int64."""
  if not shuffle:
    return np.arange(num_rows, dtype=np.int64)
  return np.random.default_rng((seed, int(epoch))).permutation(num_rows).astype(np.int64)


def contiguous_rows(global_batch_size, process_index, process_count):
  """Slots [p * B / P, (p + 1) * B / P) of a global batch: process p's block."""
  local = global_batch_size // process_count
  return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)


def process_rows(sharding, global_batch_size, devices=None):
  """The rows of a global batch that `devices` hold, sorted: [B / P] int64.

  `jax.make_array_from_process_local_data` fills a process's devices from its
  local batch in this order, so these are the slots the process must read.
  `devices`: default this process's devices of `sharding`. On a mesh whose
  processes own contiguous device blocks in process order (CPU and GPU
  hosts) this is `contiguous_rows`; a TPU mesh built from the
  physical topology need not be.
  """
  devices = sharding.addressable_devices if devices is None else devices
  index_map = sharding.devices_indices_map((global_batch_size,))
  rows = set()
  for device in devices:
    rows.update(range(global_batch_size)[index_map[device][0]])
  return np.array(sorted(rows), np.int64)


def host_positions(num_rows, global_batch_size, local_rows, epoch, *, seed, shuffle=True, start=0):
  """This process's (global position, row) pairs of one epoch, in stream order.

  Args:
    num_rows: rows in the dataset.
    global_batch_size: B.
    local_rows: the process's slots of each global batch (sorted, in [0, B)).
    epoch: which epoch.
    seed, shuffle: as in `epoch_order`.
    start: the first global position to yield (resume: start_step * B).
  Returns:
    (positions, rows): [n] int64 each; positions at or after `start` only.
  """
  first = max(epoch * num_rows, start)
  positions = np.arange(first, (epoch + 1) * num_rows, dtype=np.int64)
  mine = np.zeros(global_batch_size, bool)
  mine[np.asarray(local_rows)] = True
  positions = positions[mine[positions % global_batch_size]]
  rows = epoch_order(num_rows, seed, epoch, shuffle)[positions - epoch * num_rows]
  return positions, rows


def global_batch_rows(num_rows, global_batch_size, step, *, seed, shuffle=True):
  """The rows of global batch `step` (0-based), [B] int64: the reference order."""
  positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
  epochs = positions // num_rows
  orders = {e: epoch_order(num_rows, seed, e, shuffle) for e in np.unique(epochs)}
  return np.array([orders[e][g - e * num_rows] for g, e in zip(positions, epochs)], np.int64)
