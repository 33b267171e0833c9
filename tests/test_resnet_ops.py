"""ResNet's CPU-shaped convolutions against lax/Flax's plain convolutions: values and gradients."""

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax.models import batch_norm
from coarsemetro_jax.models import conv_ops
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


def _lax_value_and_grads(fn, x, kernel, cotangent):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(cotangent))


@pytest.mark.parametrize(
    'x_shape,size,stride',
    [
        ((2, 9, 9, 16), 3, 1),
        ((2, 8, 8, 16), 3, 2),  # even input: PyTorch's padding, ceil(H/2) outputs
        ((2, 9, 7, 16), 3, 2),  # odd and non-square
        ((2, 12, 12, 3), 7, 2),  # the stem's 7x7/2 over 3 channels
        ((1, 5, 5, 8), 1, 1),
    ],
)
def test_dot_weight_grad_conv_equals_lax(x_shape, size, stride):
  padding = size // 2
  x = _rand(x_shape, 0)
  kernel = _rand((size, size, x_shape[-1], 24), 1)
  out_hw = [(n + 2 * padding - size) // stride + 1 for n in x_shape[1:3]]
  cotangent = _rand((x_shape[0], *out_hw, 24), 2)

  conv = lambda fn: lambda x, k: fn(x, k, stride, padding)
  y, dx, dk = _lax_value_and_grads(conv(conv_ops.conv2d_dot_weight_grad), x, kernel, cotangent)
  ref_y, ref_dx, ref_dk = _lax_value_and_grads(conv(conv_ops.lax_conv2d), x, kernel, cotangent)
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_array_equal(dx, ref_dx)
  # The same sums in another order: f32 rounding only.
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_dk).max()))


def test_dot_weight_grad_keeps_the_kernel_dtype():
  x = _rand((2, 8, 8, 16), 0).astype(jnp.bfloat16)
  kernel = _rand((3, 3, 16, 8), 1).astype(jnp.bfloat16)
  loss = lambda fn: lambda k: jnp.sum(fn(x, k, 2, 1).astype(jnp.float32))
  dk = jax.grad(loss(conv_ops.conv2d_dot_weight_grad))(kernel)
  ref_dk = jax.grad(loss(conv_ops.lax_conv2d))(kernel)
  assert dk.dtype == jnp.bfloat16
  np.testing.assert_allclose(dk.astype(np.float32), ref_dk.astype(np.float32), rtol=2e-2, atol=0.5)


def _lowered_ops(fn, platform, *args):
  """Whether `fn`'s lowering for `platform` has a dot and a convolution."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return 'stablehlo.dot_general' in text, 'stablehlo.convolution' in text


def _uses_dot_weight_grad(x_shape, kernel_shape, stride, platform='cpu'):
  # The kernel gradient alone: dots for `weight_grad_by_dots`, else lax's
  # weight-gradient convolution.
  kernel_grad = jax.grad(lambda x, k: jnp.sum(conv_ops.conv2d(x, k, stride, 1)), argnums=1)
  dots, convs = _lowered_ops(kernel_grad, platform, jnp.zeros(x_shape), jnp.zeros(kernel_shape))
  assert dots != convs
  return dots


def test_conv2d_dispatch():
  strided = ((2, 56, 56, 64), (3, 3, 64, 64), 2)
  stride_1_28 = ((2, 28, 28, 128), (3, 3, 128, 128), 1)
  stride_1_14 = ((2, 14, 14, 256), (3, 3, 256, 256), 1)
  stem = ((2, 224, 224, 3), (7, 7, 3, 64), 2)
  assert _uses_dot_weight_grad(*strided)
  assert _uses_dot_weight_grad(*stride_1_28)
  assert not _uses_dot_weight_grad(*stride_1_14)
  assert not _uses_dot_weight_grad(*stem)
  # Lowered for other platforms (an AOT compile for TPU or an export for CUDA
  # made on this CPU): lax's convolution and its autodiff.
  for platform in ('tpu', 'cuda'):
    assert not _uses_dot_weight_grad(*strided, platform=platform)
    assert not _uses_dot_weight_grad(*stride_1_28, platform=platform)


@pytest.mark.parametrize('size,stride,use_bias', [(3, 1, False), (3, 2, True), (7, 2, False)])
def test_conv_module_equals_flax_conv(size, stride, use_bias):
  x = _rand((2, 10, 10, 16), 0)
  module = resnet.Conv(8, size, stride, use_bias)
  pad = size // 2
  ref = nn.Conv(
      8,
      (size, size),
      (stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
      kernel_init=resnet.conv_init,
  )
  params = module.init(jax.random.key(3), x)['params']
  ref_params = ref.init(jax.random.key(3), x)['params']
  # Same names, shapes and initial values: checkpoints convert unchanged.
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  if use_bias:  # a nonzero bias, to see it added
    params = {**params, 'bias': _rand((8,), 4)}
  cotangent = _rand(ref.apply({'params': params}, x).shape, 5)
  y, dparams, dx = _value_and_grads(module, params, x, cotangent)
  ref_y, ref_dparams, ref_dx = _value_and_grads(ref, params, x, cotangent)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), dparams, ref_dparams
  )


@pytest.mark.parametrize(
    'x_shape,stride', [((2, 7, 7, 32), 1), ((2, 8, 8, 32), 2), ((1, 9, 6, 16), 2)]
)
def test_conv_by_taps_equals_lax(x_shape, stride):
  x = _rand(x_shape, 0)
  kernel = _rand((3, 3, x_shape[-1], 24), 1)
  out_hw = [(n - 1) // stride + 1 for n in x_shape[1:3]]
  cotangent = _rand((x_shape[0], *out_hw, 24), 2)
  conv = lambda fn: lambda x, k: fn(x, k, stride, 1)
  got = _lax_value_and_grads(conv(conv_ops.conv2d_by_taps), x, kernel, cotangent)
  want = _lax_value_and_grads(conv(conv_ops.lax_conv2d), x, kernel, cotangent)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
  # bf16 in, bf16 out: the f32 sums of the same bf16 products, rounded once.
  x16, kernel16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  y16 = conv_ops.conv2d_by_taps(x16, kernel16, stride, 1)
  assert y16.dtype == jnp.bfloat16
  exact = conv_ops.lax_conv2d(x16.astype(jnp.float32), kernel16.astype(jnp.float32), stride, 1)
  np.testing.assert_allclose(
      y16.astype(jnp.float32), exact, rtol=2**-8, atol=1e-6 * float(jnp.abs(exact).max())
  )


def test_matmul_rounds_the_f32_product_once():
  x = _rand((64, 48), 0).astype(jnp.bfloat16)
  w = _rand((48, 32), 1).astype(jnp.bfloat16)
  y = conv_ops.matmul(x, w)
  assert y.dtype == jnp.bfloat16
  exact = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  np.testing.assert_allclose(y.astype(jnp.float32), exact, rtol=2**-8, atol=1e-6)
  # Differentiable, in the operands' dtype.
  dx = jax.grad(lambda x: jnp.sum(conv_ops.matmul(x, w).astype(jnp.float32)))(x)
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      dx.astype(jnp.float32), jnp.broadcast_to(w.astype(jnp.float32).sum(1), x.shape), rtol=2**-7
  )
  # f32 stays a plain f32 dot.
  np.testing.assert_array_equal(
      conv_ops.matmul(x.astype(jnp.float32), w.astype(jnp.float32)),
      jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)),
  )


def _forward_ops(x_shape, kernel_shape, stride, dtype=jnp.float32, platform='cpu'):
  conv = lambda x, k: conv_ops.conv2d(x, k, stride, 1)
  return _lowered_ops(conv, platform, jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype))


def test_conv2d_low_precision_dispatch():
  small_map = ((2, 14, 14, 256), (3, 3, 256, 256), 1)
  large_map = ((2, 56, 56, 64), (3, 3, 64, 64), 1)
  # bf16 on CPU: tap dots on small maps, lax's convolution on large ones.
  assert _forward_ops(*small_map, jnp.bfloat16) == (True, False)
  assert _forward_ops(*large_map, jnp.bfloat16) == (False, True)
  assert _forward_ops(*small_map, jnp.float32) == (False, True)
  for platform in ('tpu', 'cuda'):
    assert _forward_ops(*small_map, jnp.bfloat16, platform=platform) == (False, True)


def test_matmul_dispatch():
  # bf16 on CPU: f32 results rounded once; elsewhere the plain bf16 dot.
  x, w = jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((8, 2), jnp.bfloat16)
  f32_result = 'tensor<4x2xf32>'
  lowered = lambda p: jax.jit(conv_ops.matmul).trace(x, w).lower(lowering_platforms=(p,)).as_text()
  assert f32_result in lowered('cpu')
  assert f32_result not in lowered('tpu')


def test_dot_weight_grad_conv_under_vmap():
  # steps.apply_train vmaps the model over BatchNorm groups; the kernel is shared.
  x = _rand((3, 2, 8, 8, 16), 0)  # [groups, B, H, W, C]
  kernel = _rand((3, 3, 16, 8), 1)
  cotangent = _rand((3, 2, 4, 4, 8), 2)

  def loss(fn):
    return lambda x, k: jnp.sum(jax.vmap(lambda x: fn(x, k, 2, 1))(x) * cotangent)

  dx, dk = jax.grad(loss(conv_ops.conv2d_dot_weight_grad), argnums=(0, 1))(x, kernel)
  ref_dx, ref_dk = jax.grad(loss(conv_ops.lax_conv2d), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_dk).max()))


def _flax_batch_norm(train, dtype=jnp.float32):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


def _bn_apply(module, variables, x, cotangent, train):
  """(y, new batch_stats or None, d<y, cotangent>/d(params, x))."""

  def loss(params, x):
    out = module.apply(
        {**variables, 'params': params}, x, mutable=['batch_stats'] if train else False
    )
    y, state = out if train else (out, {})
    return jnp.sum(y.astype(jnp.float32) * cotangent), (y, state.get('batch_stats'))

  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], x
  )
  return y, stats, grads


@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_equals_flax(train):
  x = 3.0 + 2.0 * _rand((4, 5, 3, 16), 0)  # off-centre, as activations are
  cotangent = _rand(x.shape, 1)
  module = resnet.batch_norm(train, 'bn')
  variables = module.init(jax.random.key(0), x)
  ref_variables = _flax_batch_norm(train).init(jax.random.key(0), x)
  # The same variable tree and initial values: checkpoints convert unchanged.
  jax.tree.map(np.testing.assert_array_equal, variables, ref_variables)
  # Non-trivial parameters and running statistics.
  variables = {
      'params': {'scale': 1 + 0.1 * _rand((16,), 2), 'bias': _rand((16,), 3)},
      'batch_stats': {'mean': _rand((16,), 4), 'var': 1 + jnp.abs(_rand((16,), 5))},
  }
  y, stats, (dparams, dx) = _bn_apply(module, variables, x, cotangent, train)
  ref_y, ref_stats, (ref_dparams, ref_dx) = _bn_apply(
      _flax_batch_norm(train), variables, x, cotangent, train
  )
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), stats, ref_stats
  )
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
  for k in ('scale', 'bias'):
    np.testing.assert_allclose(dparams[k], ref_dparams[k], rtol=1e-5, atol=1e-4)


def test_batch_norm_bf16_and_vmap_equal_flax():
  # bf16 compute (stats in f32, output bf16) under vmap over BatchNorm groups.
  x = (1.0 + _rand((2, 4, 3, 3, 8), 0)).astype(jnp.bfloat16)  # [groups, B, H, W, C]
  cotangent = _rand(x.shape, 1)
  variables = {
      'params': {'scale': 1 + 0.1 * _rand((8,), 2), 'bias': _rand((8,), 3)},
      'batch_stats': {'mean': jnp.zeros(8), 'var': jnp.ones(8)},
  }

  def run(module):
    def loss(params, x):
      apply = lambda x: module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])[0]
      y = jax.vmap(apply)(x)
      return jnp.sum(y.astype(jnp.float32) * cotangent), y

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)

  (dparams, dx), y = run(resnet.batch_norm(True, 'bn', jnp.bfloat16))
  (ref_dparams, ref_dx), ref_y = run(_flax_batch_norm(True, jnp.bfloat16))
  assert y.dtype == dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(np.float32), ref_y.astype(np.float32), rtol=2**-7, atol=1e-2)
  np.testing.assert_allclose(
      dx.astype(np.float32), ref_dx.astype(np.float32), rtol=2**-6, atol=2e-2
  )
  for k in ('scale', 'bias'):
    np.testing.assert_allclose(dparams[k], ref_dparams[k], rtol=1e-3, atol=1e-3)


def test_batch_norm_uses_its_vjp_when_lowered_for_cpu_only():
  x = _rand((2, 3, 3, 4), 0)
  module = resnet.batch_norm(True, 'bn')
  variables = module.init(jax.random.key(0), x)
  scale, bias = variables['params']['scale'], variables['params']['bias']

  def reductions(fn, platform):
    grad = jax.grad(lambda x: jnp.sum(fn(x) ** 2))
    text = jax.jit(grad).trace(x).lower(lowering_platforms=(platform,)).as_text()
    return text.count('stablehlo.reduce')

  module_fn = lambda x: module.apply(variables, x, mutable=['batch_stats'])[0]
  custom = lambda x: batch_norm.normalize_batch(x, scale, bias, 1e-5)
  plain = lambda x: batch_norm.normalize(x, *batch_norm.batch_stats(x), scale, bias, 1e-5)
  # The module also reduces for the running averages (2), whichever form.
  assert reductions(custom, 'cpu') != reductions(plain, 'cpu')
  assert reductions(module_fn, 'cpu') == reductions(custom, 'cpu') + 2
  assert reductions(module_fn, 'tpu') == reductions(plain, 'tpu')
