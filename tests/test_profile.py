"""profile.py: fvcore-convention counts (one multiply-add = one FLOP)."""

import collections

import jax
import jax.numpy as jnp
import pytest

from coarsemetro_jax import profile
from coarsemetro_jax.models import conv_ops
from coarsemetro_jax.models import resnet


@pytest.mark.parametrize(
    'x_shape,kernel_shape,stride,dtype',
    [
        ((2, 28, 28, 32), (3, 3, 32, 16), 1, jnp.float32),  # the dot weight-gradient form
        ((2, 14, 14, 128), (3, 3, 128, 16), 1, jnp.bfloat16),  # the per-tap dots form
        ((2, 14, 14, 32), (3, 3, 32, 16), 1, jnp.float32),  # lax's convolution only
    ],
)
def test_conv2d_counted_once_whatever_its_platform_forms(x_shape, kernel_shape, stride, dtype):
  # conv_ops.conv2d carries an XLA:CPU form and lax's form (lax.platform_dependent);
  # one of them runs, so the count is that of one convolution.
  jaxpr = jax.make_jaxpr(lambda x, k: conv_ops.conv2d(x, k, stride, 1))(
      jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype)
  )
  b, h, w, c_in = x_shape
  size, _, _, c_out = kernel_shape
  out_elements = b * (h // stride) * (w // stride) * c_out
  counts = profile.count_jaxpr(jaxpr)
  assert counts.flops == out_elements * c_in * size * size
  assert counts.activations == out_elements


def test_resnet50_forward_is_4_1_gmac():
  # torchvision's ResNet-50 without its classifier: 4.09 GMAC at 224 px (fvcore).
  model = resnet.ResNet()
  images = jnp.zeros((1, 224, 224, 3))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
  by_scope = collections.defaultdict(profile.Counts)
  total = profile.count_jaxpr(jaxpr, by_scope, scope_depth=1)
  assert total.flops / 1e9 == pytest.approx(4.09, abs=0.01)
  # All of it under the module's name, including convolutions inside the
  # platform branches (traced with their own name stacks).
  assert set(by_scope) == {'ResNet'} and by_scope['ResNet'].flops == total.flops


def test_resnet_batch_norms_counted_two_per_element():
  # Every ResNet convolution feeds exactly one BatchNorm (2 FLOPs per element
  # in eval, fvcore's convention), so the norms count twice the convolutions'
  # output elements.
  model = resnet.ResNet(depths=(1, 1, 1, 1), width=16)
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
  norms = profile._norm_flops(model, variables, images)
  assert sum(norms.values()) == 2 * profile.count_jaxpr(jaxpr).activations > 0
