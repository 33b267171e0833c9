"""2-D convolution (NHWC, HWIO, symmetric padding) shaped for XLA:CPU; lax's on TPU/GPU.

f32 training. XLA:CPU computes a convolution's weight gradient as a second
convolution over transposed [C, H, W, N] copies of the input and of the output
gradient, the latter serving as a kernel as large as the output map. For
ResNet-50's strided 3x3 convolutions and its 28 x 28 stage that runs at about a
quarter of the forward convolution's rate. There the weight gradient is computed
as k*k dots instead, one per kernel tap:

  dW[i, j] = x_ij^T g,   x_ij [B*Ho*Wo, Cin] the input window that tap (i, j)
                         reads (a strided slice of the padded input),
                         g [B*Ho*Wo, Cout] the output gradient,

the same sum as lax's, in another order; the value and the input gradient are
lax's (`conv2d_dot_weight_grad`).

bf16 / f16. XLA:CPU computes low-precision convolutions, and dots whose result
has the operands' dtype, at its f32 rate; dots with f32 results run on the
CPU's bf16 units (AVX512-BF16, AMX). So `matmul` asks for f32 results and
rounds once, and 3x3 convolutions on small maps run as k*k such dots
(`conv2d_by_taps`).

Other backends, and the shapes where XLA:CPU's own convolution was as fast,
keep lax's convolution and its autodiff. The choice is made when the step is
lowered, for the platform it is lowered for (`lax.platform_dependent`), not for
the machine that traces it: an ahead-of-time compile for a TPU slice or a
`jax.export` for CUDA made on a CPU gets lax's convolutions.
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


def _low_precision(dtype):
  return jnp.dtype(dtype).itemsize < 4


def _dot_f32_result(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul(x, w):
  """x [..., K] @ w [K, M] in their dtype (the same for both).

  On XLA:CPU a bf16 x bf16 -> bf16 dot is computed by upcasting both operands
  to f32, while bf16 x bf16 -> f32 runs the CPU's bf16 units (AVX512-BF16 /
  AMX: 2-5x the f32 rate at ResNet's 1x1 shapes); so the product is asked for
  in f32 and rounded to the operands' dtype once, the value XLA's upcast gives.
  """
  if _low_precision(x.dtype):
    return lax.platform_dependent(x, w, cpu=_dot_f32_result, default=jnp.dot)
  return jnp.dot(x, w)


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


def conv2d_by_taps(x, kernel, stride, padding):
  """`lax_conv2d` as a sum of one dot per tap, accumulated in f32 (for bf16 on XLA:CPU).

  XLA:CPU computes bf16 convolutions at its f32 rate, but bf16 dots with f32
  results on the CPU's bf16 units; for small maps with many channels (ResNet's
  last two stages) k*k such dots beat the convolution 1.7-6x despite copying
  the input windows.
  """
  size, _, c_in, c_out = kernel.shape
  b = x.shape[0]
  out_h, out_w = [(n + 2 * padding - size) // stride + 1 for n in x.shape[1:3]]
  windows = tap_windows(x, size, stride, padding, (out_h, out_w))
  taps = kernel.reshape(size * size, c_in, c_out)
  y = sum(
      jnp.dot(window.reshape(-1, c_in), taps[t], preferred_element_type=jnp.float32)
      for t, window in enumerate(windows)
  )  # [B*Ho*Wo, Cout]
  return y.astype(x.dtype).reshape(b, out_h, out_w, c_out)


def taps_beat_lax(x_shape, kernel_shape, stride):
  """Whether `conv2d_by_taps` is faster for a low-precision conv on XLA:CPU.

  Measured in bf16 at ResNet-50's shapes (batch 16): 1.7x for 3x3 convs to
  14 x 14 x 256 outputs, 6x to 7 x 7 x 512; 0.3-0.7x on 56 x 56 and 28 x 28
  maps, where copying the windows costs more than the dots save.
  """
  size, _, c_in, _ = kernel_shape
  out_h = (x_shape[1] + 2 * (size // 2) - size) // stride + 1
  return size > 1 and c_in >= 128 and out_h <= 16


def cpu_conv2d_fn(x_shape, kernel_shape, stride, dtype):
  """The convolution function XLA:CPU runs fastest for these shapes: fn(x, kernel, stride, padding)."""
  if _low_precision(dtype):
    if taps_beat_lax(x_shape, kernel_shape, stride):
      return conv2d_by_taps
  elif dots_beat_lax(x_shape, kernel_shape, stride):
    return conv2d_dot_weight_grad
  return lax_conv2d


def conv2d(x, kernel, stride=1, padding=0):
  """x [B, H, W, Cin], kernel [k, k, Cin, Cout] -> [B, Ho, Wo, Cout], lax's value.

  Lowered for TPU and GPU: lax's convolution. Lowered for XLA:CPU:
  `conv2d_by_taps` for bf16/f16 where it is faster, `conv2d_dot_weight_grad`
  for f32 where its weight gradient is faster, lax's convolution elsewhere.
  """
  cpu_fn = cpu_conv2d_fn(x.shape, kernel.shape, stride, x.dtype)
  if cpu_fn is lax_conv2d:
    return lax_conv2d(x, kernel, stride, padding)
  return lax.platform_dependent(
      x,
      kernel,
      cpu=lambda x, k: cpu_fn(x, k, stride, padding),
      default=lambda x, k: lax_conv2d(x, k, stride, padding),
  )
