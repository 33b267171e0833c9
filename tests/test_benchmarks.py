"""Smoke runs of the efficiency benchmarks (tiny models, one round) and the PyTorch loss port.

That the scripts run and print the expected table rows, with the JAX and
PyTorch sides computing the same thing; no timing is asserted. Kept to one JAX
model, the transformer part and one batch size: three small programs compile.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp

from benchmarks import _timing
from benchmarks import inference
from benchmarks import memory
from benchmarks import train_step
from coarsemetro_jax import losses
# pylint: enable=g-import-not-at-top,wrong-import-position

SMOKE = ['--tiny', '--quick', '--parts=transformer', '--batch_sizes=2',
         '--torch_threads=1', '--no_torch_coarsemetro', '--models=coarsemetro']
TORCH = 'PyTorch eager (1 thr)'


def _rows(table):
  """Table body as lists of cells."""
  lines = table.splitlines()[2:]
  return [[c.strip() for c in line.strip('|').split('|')] for line in lines]


def test_inference_table():
  rows = _rows(inference.main(SMOKE[:-1] + ['--models=fastmetro']))
  assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
      ('transformer', '2', 'FastMETRO-S', 'JAX'),
      ('transformer', '2', 'FastMETRO-S', TORCH)]
  assert rows[1][6].startswith('1.00x')          # the baseline against itself
  assert float(rows[0][9]) < 1e-4                # same weights, same outputs


def test_train_step_table():
  rows = _rows(train_step.main(SMOKE))
  assert [(r[2], r[3]) for r in rows] == [('CoarseMETRO-S', 'JAX'), ('FastMETRO-S', TORCH)]
  assert all(np.isfinite(float(r[9])) for r in rows)   # first losses


def test_memory_tables():
  memory_table, count_table = memory.main(SMOKE + ['--modes=inference'])
  (row,) = _rows(memory_table)
  assert row[:5] == ['CoarseMETRO-S', 'transformer', 'inference', '2', 'f32']
  args_mb, out_mb, alias_mb, temp_mb, peak_mb = (float(c) for c in row[5:10])
  assert peak_mb == pytest.approx(args_mb + out_mb + temp_mb - alias_mb, abs=0.11)
  (count,) = _rows(count_table)
  assert count[0] == 'CoarseMETRO-S-resnet' and float(count[3]) > 0


def test_torch_loss_matches_jax_loss():
  """The PyTorch train step's loss is losses.compute_loss (no edge/normal terms)."""
  topology = _timing.random_topology(_timing.TINY_LEVELS)
  config = _timing.model_config('fastmetro', use_tiny=True)
  pair = _timing.Pair('fastmetro', config, topology, None, None, {}, None, None)
  batch = train_step.random_batch(pair, 'full', 3)
  rng = np.random.default_rng(5)
  outputs = {'pred_cam': rng.normal(size=(3, 3)),
             'pred_3d_joints': rng.normal(size=(3, 14, 3))}
  for level, n in zip(('fine', 'intermediate', 'coarse'), _timing.TINY_LEVELS):
    outputs[f'pred_3d_vertices_{level}'] = rng.normal(size=(3, n, 3))
  outputs = {k: v.astype(np.float32) for k, v in outputs.items()}
  regressor = train_step.h36m_regressor(topology.num_vertices[0])
  want, _ = losses.compute_loss(
      outputs, batch, batch['gt_vertices'],
      lambda v: jnp.einsum('jv,bvc->bjc', regressor, v), topology, config.loss)
  got = train_step.torch_loss(
      {k: torch.from_numpy(v) for k, v in outputs.items()},
      {k: torch.from_numpy(v) for k, v in batch.items()}, torch.from_numpy(regressor),
      topology, config.loss)
  assert float(want) > 1.0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
