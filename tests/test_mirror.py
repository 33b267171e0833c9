"""Mirror test-time augmentation: vertex permutations, mirrored outputs mapped back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import body_model
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import losses
from coarsemetro_jax import mirror
from configs import embedded


def symmetric_mesh(rng, half=20):
  """Vertices 0..half-1 at x > 0, their mirrors at half..2*half-1, two on x = 0."""
  right = rng.uniform(0.05, 0.5, (half, 3)) * np.array([1, 1, 1]) + [0, -0.5, -0.2]
  middle = np.array([[0.0, 0.3, 0.1], [0.0, -0.4, 0.2]])
  return np.concatenate([right, right * [-1, 1, 1], middle]).astype(np.float32)


def test_j14_flip_perm_swaps_left_and_right():
  names = joint_tables.J14_NAMES
  for i, j in enumerate(joint_tables.J14_FLIP_PERM):
    swapped = names[i].replace('R_', 'X_').replace('L_', 'R_').replace('X_', 'L_')
    assert names[j] == swapped


def test_mirror_permutation_pairs_mirrored_vertices():
  rng = np.random.default_rng(0)
  v = symmetric_mesh(rng)
  order = rng.permutation(len(v))  # partners at arbitrary indices
  v = v[order]
  perm = mirror.mirror_permutation(v)
  np.testing.assert_allclose(v[perm], v * [-1, 1, 1], atol=1e-6)
  np.testing.assert_array_equal(perm[perm], np.arange(len(v)))
  on_plane = np.flatnonzero(np.abs(v[:, 0]) < 1e-9)
  np.testing.assert_array_equal(perm[on_plane], on_plane)


def test_mirror_permutation_rejects_an_asymmetric_template():
  v = symmetric_mesh(np.random.default_rng(1))
  v[3, 0] += 0.05  # one vertex 5 cm off
  with pytest.raises(ValueError, match='vertex 3 mirrored is 50.0 mm'):
    mirror.mirror_permutation(v)


def test_embedded_template_is_symmetric():
  config = embedded.get_config()
  body = body_model.load_body_model(config.body_model.path, config.body_model.h36m_regressor)
  v = np.asarray(body.v_template)
  perm = mirror.mirror_permutation(v)
  assert (perm[perm] == np.arange(len(v))).mean() > 0.99
  assert np.median(np.linalg.norm(v[perm] - v * [-1, 1, 1], axis=1)) < 1e-4


def _outputs(rng, v, b=3):
  return {
      'pred_3d_vertices_fine': jnp.asarray(rng.normal(size=(b, len(v), 3)), jnp.float32),
      'pred_3d_vertices_coarse': jnp.asarray(rng.normal(size=(b, 5, 3)), jnp.float32),
      'pred_3d_joints': jnp.asarray(rng.normal(size=(b, 14, 3)), jnp.float32),
      'pred_cam': jnp.asarray(rng.uniform(0.5, 1.5, (b, 3)), jnp.float32),
  }


def test_unflipped_prediction_projects_to_the_mirrored_image():
  rng = np.random.default_rng(2)
  v = symmetric_mesh(rng)
  perm = mirror.mirror_permutation(v)
  out = _outputs(rng, v)
  back = mirror.unflip_outputs(out, perm)
  # The point that projects to u in the mirrored crop projects to -u here, and
  # vertex i of the mirrored body is vertex perm[i] of this one.
  proj = np.asarray(losses.orthographic_projection(out['pred_3d_vertices_fine'], out['pred_cam']))
  proj_back = np.asarray(
      losses.orthographic_projection(back['pred_3d_vertices_fine'], back['pred_cam'])
  )
  np.testing.assert_allclose(proj_back, proj[:, perm] * [-1, 1], rtol=1e-5, atol=1e-6)
  j = np.asarray(out['pred_3d_joints'])
  np.testing.assert_allclose(
      back['pred_3d_joints'], j[:, list(joint_tables.J14_FLIP_PERM)] * [-1, 1, 1]
  )
  # Mapping back twice is the identity.
  twice = mirror.unflip_outputs(back, perm)
  for k in mirror.FLIPPED_KEYS:
    np.testing.assert_allclose(twice[k], out[k], rtol=1e-6)


def test_flip_average_of_an_equivariant_model_is_its_prediction():
  rng = np.random.default_rng(3)
  v = symmetric_mesh(rng)
  perm = mirror.mirror_permutation(v)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  plain, other = _outputs(rng, v), _outputs(rng, v)
  mirrored_plain = mirror.unflip_outputs(plain, perm)  # mirroring is an involution

  def model(x):  # plain on the images, its mirror image on the mirrored images
    is_mirror = jnp.all(x == images[:, :, ::-1])
    return jax.tree.map(lambda a, b: jnp.where(is_mirror, a, b), {**other, **mirrored_plain}, plain)

  avg = jax.jit(lambda x: mirror.flip_averaged_outputs(model, x, perm))(images)
  for k, value in plain.items():
    np.testing.assert_allclose(avg[k], value, rtol=1e-6, atol=1e-7, err_msg=k)

  # A model that predicts something else on the mirrored image gets averaged.
  def biased(x):
    is_mirror = jnp.all(x == images[:, :, ::-1])
    return jax.tree.map(lambda a, b: jnp.where(is_mirror, a, b), other, plain)

  avg = mirror.flip_averaged_outputs(biased, images, perm)
  back = mirror.unflip_outputs(other, perm)
  np.testing.assert_allclose(
      avg['pred_cam'], 0.5 * (plain['pred_cam'] + back['pred_cam']), rtol=1e-6
  )
  np.testing.assert_allclose(avg['pred_3d_vertices_coarse'], plain['pred_3d_vertices_coarse'])
