"""2-D convolution (NHWC, HWIO, symmetric padding) whose weight gradient suits XLA:CPU.

XLA:CPU computes a convolution's weight gradient as a second convolution over
transposed [C, H, W, N] copies of the input and of the output gradient. For a
strided convolution that second convolution has a dilated kernel, which the
CPU backend runs on its slow generic path; for mid-sized maps (ResNet's 28 x 28
stage) its fast path is slow too. There the weight gradient is computed here as
k*k dots instead, one per kernel tap:

  dW[i, j] = x_ij^T g,   x_ij [B*Ho*Wo, Cin] the input window that tap (i, j)
                         reads (a strided slice of the padded input),
                         g [B*Ho*Wo, Cout] the output gradient,

the same sum as lax's, in another order. The value and the input gradient are
lax's. Other backends (TPU, GPU), and the shapes where XLA:CPU's own weight
gradient was as fast, keep lax's convolution and its autodiff.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def lax_conv2d(x, kernel, stride, padding):
  """lax's convolution: x [B, H, W, Cin], kernel [k, k, Cin, Cout] -> [B, Ho, Wo, Cout]."""
  pads = ((padding, padding), (padding, padding))
  return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=_DIMENSIONS)


def tap_windows(x, size, stride, padding, out_hw):
  """The k*k [B, Ho, Wo, Cin] windows of the padded input, tap (i, j) at i * size + j."""
  b, _, _, c = x.shape
  out_h, out_w = out_hw
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return [
      lax.slice(
          padded,
          (0, i, j, 0),
          (b, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
          (1, stride, stride, 1),
      )
      for i in range(size)
      for j in range(size)
  ]


def weight_grad_by_dots(x, g, size, stride, padding):
  """d<conv(x, W), g>/dW as one dot per tap: x [B, H, W, Cin], g [B, Ho, Wo, Cout]."""
  c_in, c_out = x.shape[-1], g.shape[-1]
  g2 = g.reshape(-1, c_out)  # [B*Ho*Wo, Cout]
  taps = [
      lax.dot_general(
          window.reshape(-1, c_in),
          g2,
          (((0,), (0,)), ((), ())),
          preferred_element_type=jnp.float32,
      )  # [Cin, Cout]
      for window in tap_windows(x, size, stride, padding, g.shape[1:3])
  ]
  return jnp.stack(taps).reshape(size, size, c_in, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_dot_weight_grad(x, kernel, stride, padding):
  """`lax_conv2d` with the weight gradient of `weight_grad_by_dots`."""
  return lax_conv2d(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding):
  return lax_conv2d(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, residuals, g):
  x, kernel = residuals
  # lax's input gradient (its forward convolution is dead code under jit).
  _, input_vjp = jax.vjp(lambda x: lax_conv2d(x, kernel, stride, padding), x)
  (dx,) = input_vjp(g)
  dkernel = weight_grad_by_dots(x, g, kernel.shape[0], stride, padding)
  return dx, dkernel.astype(kernel.dtype)


conv2d_dot_weight_grad.defvjp(_fwd, _bwd)


def dots_beat_lax(x_shape, kernel_shape, stride):
  """Whether XLA:CPU gets the weight gradient faster by `weight_grad_by_dots`.

  Measured at ResNet-50's shapes (batch 16, 224 px): 1.2-2x for every
  stride-2 3x3 convolution and for 3x3 convolutions on 28 x 28 maps; slower
  for 56 x 56 and 14 x 14 maps and for the 7x7 stem (3 input channels).
  """
  size, _, c_in, _ = kernel_shape
  if size == 1 or c_in < 16:
    return False
  return stride > 1 or 20 <= x_shape[1] <= 40


def conv2d(x, kernel, stride=1, padding=0):
  """x [B, H, W, Cin], kernel [k, k, Cin, Cout] -> [B, Ho, Wo, Cout], lax's value."""
  if jax.default_backend() == 'cpu' and dots_beat_lax(x.shape, kernel.shape, stride):
    return conv2d_dot_weight_grad(x, kernel, stride, padding)
  return lax_conv2d(x, kernel, stride, padding)
