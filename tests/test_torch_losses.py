"""torch_reference/losses.py (the train-step benchmark's PyTorch loss) is losses.compute_loss."""

import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import losses
from configs import tiny

torch = pytest.importorskip('torch')
from torch_reference import losses as torch_losses


def fully_labelled_batch(rng, batch, num_vertices):
  """Every example carries every label (the case the PyTorch port covers)."""
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  ones = np.ones((batch,), np.float32)
  return {
      'joints_2d': np.concatenate(
          [np.tanh(f32(batch, 24, 2)), (rng.random((batch, 24, 1)) > 0.2).astype(np.float32)], -1
      ),
      'joints_3d': np.concatenate(
          [0.3 * f32(batch, 24, 3), np.ones((batch, 24, 1), np.float32)], -1
      ),
      'gt_vertices': 0.3 * f32(batch, num_vertices, 3),
      'has_smpl': ones,
      'has_3d_joints': ones,
      'has_2d_joints': ones,
      'mask': ones,
  }


def test_torch_loss_matches_jax_loss(topology):
  """The same outputs and labels give the same total (no edge/normal terms)."""
  config = tiny.get_config('fastmetro').loss
  config.use_edge_normal = False
  rng = np.random.default_rng(5)
  batch = fully_labelled_batch(rng, 3, topology.num_vertices[0])
  outputs = {'pred_cam': rng.normal(size=(3, 3)), 'pred_3d_joints': rng.normal(size=(3, 14, 3))}
  for level, n in zip(('fine', 'intermediate', 'coarse'), topology.num_vertices):
    outputs[f'pred_3d_vertices_{level}'] = rng.normal(size=(3, n, 3))
  outputs = {k: v.astype(np.float32) for k, v in outputs.items()}
  regressor = rng.random((17, topology.num_vertices[0])).astype(np.float32)
  regressor /= regressor.sum(1, keepdims=True)
  want, _ = losses.compute_loss(
      outputs,
      batch,
      batch['gt_vertices'],
      lambda v: jnp.einsum('jv,bvc->bjc', regressor, v),
      topology,
      config,
  )
  got = torch_losses.compute_loss(
      {k: torch.from_numpy(v) for k, v in outputs.items()},
      {k: torch.from_numpy(v) for k, v in batch.items()},
      torch.from_numpy(regressor),
      topology,
      config,
  )
  assert float(want) > 1.0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
