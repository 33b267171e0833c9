"""ResNet's CPU-shaped convolutions against lax/Flax's plain convolutions: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax.models import resnet


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _value_and_grads(module, params, x, cotangent):
  """(y, d<y, cotangent>/dparams, d<y, cotangent>/dx) of a stateless Flax module."""
  y = module.apply({'params': params}, x)
  loss = lambda p, x: jnp.sum(module.apply({'params': p}, x) * cotangent)
  dparams, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  return y, dparams, dx


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_conv_equals_1x1_conv(stride):
  x = _rand((2, 6, 5, 8), 0)  # odd width: the strided slice keeps ceil(5/2) columns
  out_shape = (2, -(-6 // stride), -(-5 // stride), 12)
  cotangent = _rand(out_shape, 1)
  params = {'kernel': _rand((1, 1, 8, 12), 2)}  # nn.Conv's parameter tree and shape
  y, dparams, dx = _value_and_grads(resnet.PointwiseConv(12, stride), params, x, cotangent)
  ref = resnet.conv(12, 1, stride, 'conv')
  ref_y, ref_dparams, ref_dx = _value_and_grads(ref, params, x, cotangent)
  assert y.shape == out_shape
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams['kernel'], ref_dparams['kernel'], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
