"""BatchNorm over the last axis: Flax's nn.BatchNorm, with a hand-written backward pass on XLA:CPU.

Same variables (params 'scale', 'bias'; batch_stats 'mean', 'var'), the same
running-average update and the same value as nn.BatchNorm(use_fast_variance=
True, force_float32_reductions=True) normalising the last axis. In training
on XLA:CPU, the normalisation has a custom VJP:

  xhat = (x - mean) * rstd,   dscale = sum(g * xhat),   dbias = sum(g),
  dx = scale * rstd * (g - dbias / n - xhat * dscale / n),

two reductions and one elementwise pass, where XLA:CPU's autodiff of the
forward materialises x - mean in the forward pass and makes three reductions
and two more full-size passes in the backward. Lowered for other platforms,
and in eval mode, the plain formula and its autodiff.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def batch_stats(x):
  """(mean, var) over all but the last axis, in f32; var = E[x^2] - E[x]^2 clipped at 0 (Flax's)."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.float32)
  mean = x.mean(axes)
  var = jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)
  return mean, var


def normalize(x, mean, var, scale, bias, epsilon):
  """(x - mean) * (rsqrt(var + epsilon) * scale) + bias, in f32 (nn.BatchNorm's order)."""
  return (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x, scale, bias, epsilon):
  """`normalize` with this batch's `batch_stats`: x [..., C] -> f32 [..., C]."""
  mean, var = batch_stats(x)
  return normalize(x, mean, var, scale, bias, epsilon)


def _normalize_batch_fwd(x, scale, bias, epsilon):
  mean, var = batch_stats(x)
  rstd = lax.rsqrt(var + epsilon)
  y = (x.astype(jnp.float32) - mean) * (rstd * scale) + bias
  return y, (x, mean, rstd, scale)


def _normalize_batch_bwd(epsilon, residuals, g):
  del epsilon
  x, mean, rstd, scale = residuals
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dbias = g.sum(axes)
  dscale = (g * xhat).sum(axes)
  dx = (scale * rstd) * (g - dbias / n - xhat * (dscale / n))
  return dx.astype(x.dtype), dscale, dbias


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm(use_running_average, momentum, epsilon, dtype, scale_init) over the last axis."""

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    # x [..., C] -> [..., C] in self.dtype
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      y = normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
      return y.astype(self.dtype)
    mean, var = batch_stats(x)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    # Lowered for XLA:CPU, `normalize_batch` recomputes the statistics above
    # (XLA merges the reductions) so that its backward pass can be written as one.
    y = lax.platform_dependent(
        x,
        scale,
        bias,
        cpu=lambda x, scale, bias: normalize_batch(x, scale, bias, self.epsilon),
        default=lambda x, scale, bias: normalize(x, mean, var, scale, bias, self.epsilon),
    )
    return y.astype(self.dtype)
