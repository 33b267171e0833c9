"""Serving export: the jax.export artifact computes what the jitted model does."""

import os

import jax
import numpy as np
import pytest
from test_infer import random_regressor
from test_infer import random_variables
from test_infer import tiny_config

from coarsemetro_jax import build
from coarsemetro_jax import export
from coarsemetro_jax import infer


@pytest.fixture(scope='module')
def tiny(topology):
  del topology  # skips when no mesh hierarchy is available
  config = tiny_config()
  model = build.build(config, body=False).model
  variables = random_variables(model, config.data.image_size)
  return model, variables, random_regressor(6890)


@pytest.fixture(scope='module')
def artifact(tiny, tmp_path_factory):
  model, variables, regressor = tiny
  exported = export.export_inference(model, variables, 64, regressor, platforms=('cpu', 'cuda'))
  return export.save(str(tmp_path_factory.mktemp('export') / 'tiny.jaxexport'), exported)


def test_exported_equals_jitted_model_at_two_batch_sizes(tiny, artifact):
  model, variables, regressor = tiny
  served = export.load(artifact)
  (spec,) = served.exported.in_avals
  assert jax.export.is_symbolic_dim(spec.shape[0]) and spec.shape[1:] == (64, 64, 3)
  assert served.exported.platforms == ('cpu', 'cuda')
  images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  want = jax.jit(infer.make_predict_fn(model, regressor))(variables, images)
  assert sorted(want) == ['pred_2d_joints', 'pred_3d_joints', 'pred_cam', 'pred_vertices']
  for batch in (3, 1):  # eval-mode examples are independent: batch 1 = row 0
    got = served(images[:batch])
    assert sorted(got) == sorted(want)
    for key in want:
      assert got[key].shape == (batch,) + want[key].shape[1:]
      # Same program up to XLA's fusion of the embedded weights: float32 round-off.
      np.testing.assert_allclose(
          got[key], want[key][:batch], rtol=1e-5, atol=1e-5, err_msg=f'{key}, batch {batch}'
      )


def test_load_rejects_bad_files_and_shapes(artifact, tmp_path):
  bad = tmp_path / 'bad.jaxexport'
  bad.write_bytes(b'not an artifact')
  with pytest.raises(ValueError, match='bad.jaxexport: not a serialized jax.export artifact'):
    export.load(str(bad))
  with pytest.raises(ValueError, match=r'expected images \[B, 64, 64, 3\], got \[2, 32, 32, 3\]'):
    export.load(artifact)(np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.skipif(
    not os.environ.get('TEST_SAVED_MODEL'),
    reason='jax2tf + TensorFlow take ~45 s on CI; set TEST_SAVED_MODEL=1',
)
def test_tf_saved_model_equals_jitted_model(tiny, tmp_path):
  tf = pytest.importorskip('tensorflow')
  model, variables, regressor = tiny
  path = export.save_tf_saved_model(str(tmp_path / 'sm'), model, variables, 64, regressor)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
  got = loaded.serve(images)
  want = jax.jit(infer.make_predict_fn(model, regressor))(variables, images)
  for key in want:
    np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
