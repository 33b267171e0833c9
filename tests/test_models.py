"""Model structure, shapes and behaviour: ResNet, transformer blocks, FastMETRO, CoarseMETRO."""

import math
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import models
from coarsemetro_jax.models import coarsemetro
from coarsemetro_jax.models import fastmetro
from coarsemetro_jax.models import resnet
from coarsemetro_jax.models import transformer as tfm
from configs import fastmetro as fastmetro_config
from configs import r50
from configs import tiny

IMAGES_224 = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
OUTPUT_SHAPES = {
    'pred_cam': (2, 3),
    'pred_3d_joints': (2, 14, 3),
    'pred_3d_vertices_coarse': (2, 431, 3),
    'pred_3d_vertices_intermediate': (2, 1723, 3),
    'pred_3d_vertices_fine': (2, 6890, 3),
}


def abstract_variables(model, images):
  return jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x), images
  )


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Expected PyTorch state dicts (FastMETRO reference §1.9, §2) and the naming rule.


def torchvision_resnet50_keys():
  """torchvision resnet50 state-dict keys/shapes without avgpool/fc."""
  keys = {'conv1.weight': (64, 3, 7, 7)}
  bn = lambda p, c: keys.update(
      {f'{p}.{n}': (c,) for n in ('weight', 'bias', 'running_mean', 'running_var')}
  )
  bn('bn1', 64)
  inplanes = 64
  for i, (depth, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for b in range(depth):
      p = f'layer{i + 1}.{b}'
      keys[f'{p}.conv1.weight'] = (planes, inplanes, 1, 1)
      keys[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
      keys[f'{p}.conv3.weight'] = (planes * 4, planes, 1, 1)
      for n, c in (('bn1', planes), ('bn2', planes), ('bn3', planes * 4)):
        bn(f'{p}.{n}', c)
      if b == 0:
        keys[f'{p}.downsample.0.weight'] = (planes * 4, inplanes, 1, 1)
        bn(f'{p}.downsample.1', planes * 4)
      inplanes = planes * 4
  return keys


def fastmetro_keys(num_layers):
  """FastMETRO_Body_Network non-backbone keys (reference §1.9)."""
  keys = {
      'dim_reduce_enc_cam.weight': (128, 512),
      'dim_reduce_enc_cam.bias': (128,),
      'dim_reduce_enc_img.weight': (128, 512),
      'dim_reduce_enc_img.bias': (128,),
      'dim_reduce_dec.weight': (128, 512),
      'dim_reduce_dec.bias': (128,),
      'cam_token_embed.weight': (1, 512),
      'joint_token_embed.weight': (14, 512),
      'vertex_token_embed.weight': (431, 512),
      'xyz_regressor.weight': (3, 128),
      'xyz_regressor.bias': (3,),
      'cam_predictor.weight': (3, 128),
      'cam_predictor.bias': (3,),
      'conv_1x1.weight': (512, 2048, 1, 1),
      'conv_1x1.bias': (512,),
      'coarse2intermediate_upsample.weight': (1723, 431),
      'coarse2intermediate_upsample.bias': (1723,),
  }
  for t, (d, f) in ((1, (512, 2048)), (2, (128, 512))):
    for part, attns, norms in (
        ('encoder', ('self_attn',), 2),
        ('decoder', ('self_attn', 'multihead_attn'), 3),
    ):
      for i in range(num_layers):
        p = f'transformer_{t}.{part}.layers.{i}'
        for a in attns:
          keys.update(
              {
                  f'{p}.{a}.in_proj_weight': (3 * d, d),
                  f'{p}.{a}.in_proj_bias': (3 * d,),
                  f'{p}.{a}.out_proj.weight': (d, d),
                  f'{p}.{a}.out_proj.bias': (d,),
              }
          )
        keys.update(
            {
                f'{p}.linear1.weight': (f, d),
                f'{p}.linear1.bias': (f,),
                f'{p}.linear2.weight': (d, f),
                f'{p}.linear2.bias': (d,),
            }
        )
        for n in range(1, norms + 1):
          keys.update({f'{p}.norm{n}.weight': (d,), f'{p}.norm{n}.bias': (d,)})
      keys.update(
          {f'transformer_{t}.{part}.norm.weight': (d,), f'transformer_{t}.{part}.norm.bias': (d,)}
      )
  return keys


def torch_to_flax(key, shape):
  """The naming rule: `a.b.0.c.weight` -> ('params'|'batch_stats', 'a/b_0/c/<leaf>'), shape."""
  module, leaf = key.rsplit('.', 1)
  module = re.sub(r'\.(\d+)(?=\.|$)', r'_\1', module).replace('.', '/')
  if leaf in ('running_mean', 'running_var'):
    return 'batch_stats', f"{module}/{'mean' if leaf == 'running_mean' else 'var'}", shape
  if leaf == 'in_proj_weight':
    return 'params', f'{module}/in_proj/kernel', shape[::-1]
  if leaf == 'in_proj_bias':
    return 'params', f'{module}/in_proj/bias', shape
  if leaf == 'bias':
    return 'params', f'{module}/bias', shape
  if module.endswith('_embed'):
    return 'params', f'{module}/embedding', shape
  if len(shape) == 1:  # LayerNorm / BatchNorm weight
    return 'params', f'{module}/scale', shape
  if len(shape) == 4:  # OIHW -> HWIO
    return 'params', f'{module}/kernel', (shape[2], shape[3], shape[1], shape[0])
  return 'params', f'{module}/kernel', shape[::-1]


def expected_flax_tree(torch_keys, prefix=''):
  out = {'params': {}, 'batch_stats': {}}
  for key, shape in torch_keys.items():
    collection, path, fshape = torch_to_flax(key, shape)
    out[collection][prefix + path] = tuple(fshape)
  return out


def actual_flax_tree(variables):
  return {
      c: {
          k: tuple(v.shape)
          for k, v in traverse_util.flatten_dict(variables.get(c, {}), sep='/').items()
      }
      for c in ('params', 'batch_stats')
  }


# ---------------------------------------------------------------------------
# Full-size structure (eval_shape only: no compilation).


def test_resnet50_matches_torchvision_layout():
  variables = abstract_variables(resnet.ResNet50(), IMAGES_224)
  assert actual_flax_tree(variables) == expected_flax_tree(torchvision_resnet50_keys())
  assert count(variables['params']) == 23_508_032
  out = jax.eval_shape(lambda v, x: resnet.ResNet50().apply(v, x), variables, IMAGES_224)
  assert out.shape == (2, 7, 7, 2048)


@pytest.mark.parametrize(
    'size,layers,total', [('S', 1, 33_549_398), ('M', 2, 41_368_662), ('L', 3, 49_187_926)]
)
def test_fastmetro_param_tree_equals_pytorch_key_table(topology, size, layers, total):
  config = fastmetro_config.get_config(f'{size}-r50')
  model = models.build_model(config.model, topology)
  variables = abstract_variables(model, IMAGES_224)
  expected = expected_flax_tree(fastmetro_keys(layers))
  backbone = expected_flax_tree(torchvision_resnet50_keys(), prefix='backbone/')
  for c in expected:
    expected[c].update(backbone[c])
  assert actual_flax_tree(variables) == expected
  assert count(variables['params']) == total
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, IMAGES_224)
  assert {k: v.shape for k, v in out.items()} == OUTPUT_SHAPES


def test_coarsemetro_r50_structure(topology):
  config = r50.get_config()
  model = models.build_model(config.model, topology)
  variables = abstract_variables(model, IMAGES_224)
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  shapes = {k: v.shape for k, v in params.items()}
  # Token-axis linears: 14 -> 48 -> 192 -> 384 -> 431, learned 431 -> 1723.
  assert shapes['vertex_token_init/kernel'] == (14, 48)
  assert shapes['vertex_upsample_0/kernel'] == (48, 192)
  assert shapes['vertex_upsample_1/kernel'] == (192, 384)
  assert shapes['vertex_upsample_2/kernel'] == (384, 431)
  assert shapes['coarse2intermediate_upsample/kernel'] == (431, 1723)
  # Three stages of one encoder + one decoder block, widths 512 -> 128 -> 64.
  for s, (d, f) in enumerate(zip((512, 128, 64), (2048, 512, 256)), start=1):
    p = f'transformer_{s}'
    assert shapes[f'{p}/encoder/layers_0/self_attn/in_proj/kernel'] == (d, 3 * d)
    assert shapes[f'{p}/encoder/layers_0/linear1/kernel'] == (d, f)
    for attn in ('self_attn', 'multihead_attn', 'vertex_attn'):
      assert shapes[f'{p}/decoder/layers_0/{attn}/in_proj/kernel'] == (d, 3 * d)
    assert not any(k.startswith(f'{p}/encoder/layers_1') for k in shapes)
  assert shapes['dim_reduce_dec_0/kernel'] == (512, 128)
  assert shapes['dim_reduce_enc_img_1/kernel'] == (128, 64)
  assert shapes['cam_predictor/kernel'] == (64, 3)
  assert 'vertex_token_embed/embedding' not in shapes  # vertex tokens come from joints
  non_backbone = sum(np.prod(v) for k, v in shapes.items() if not k.startswith('backbone/'))
  attn = lambda d: 4 * d * d + 4 * d
  ffn = lambda d, f: 2 * d * f + f + d
  expected = 2048 * 512 + 512 + 15 * 512 + 14 * 48 + 48  # conv_1x1, tokens, init
  for d, f in zip((512, 128, 64), (2048, 512, 256)):
    expected += attn(d) + ffn(d, f) + 3 * 2 * d  # encoder + its norms
    expected += 3 * attn(d) + ffn(d, f) + 6 * 2 * d  # decoder + its norms
  expected += 3 * (512 * 128 + 128) + 3 * (128 * 64 + 64)  # width reductions
  expected += 48 * 192 + 192 + 192 * 384 + 384 + 384 * 431 + 431  # token up-sampling
  expected += 2 * (64 * 3 + 3) + 431 * 1723 + 1723  # heads, learned up-sampling
  assert non_backbone == expected
  assert abs(non_backbone / 11.6e6 - 1) < 0.03  # paper Table 1: 11.6M
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, IMAGES_224)
  assert {k: v.shape for k, v in out.items()} == OUTPUT_SHAPES


@pytest.mark.parametrize('placement', ['none', 'beginning', 'end'])
def test_vertex_attention_placement(topology, placement):
  config = tiny.get_config()
  config.model.vertex_attention = placement
  model = models.build_model(config.model, topology)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = traverse_util.flatten_dict(abstract_variables(model, images)['params'], sep='/')
  has = any('/vertex_attn/' in k for k in params)
  assert has == (placement != 'none')
  if placement != 'none':
    # Keys/values of the vertex attention are the previous-resolution tokens.
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=['intermediates']),
        abstract_variables(model, images),
        images,
    )
    inter = traverse_util.flatten_dict(state['intermediates'], sep='/')
    lq_lk = {k: v[0].shape[-2:] for k, v in inter.items() if '/vertex_attn/' in k}
    assert lq_lk == {
        'transformer_1/decoder/layers_0/vertex_attn/attention_weights': (14 + 48, 48),
        'transformer_2/decoder/layers_0/vertex_attn/attention_weights': (14 + 192, 48),
        'transformer_3/decoder/layers_0/vertex_attn/attention_weights': (14 + 384, 192),
    }


def test_unknown_model_options_raise(topology):
  config = tiny.get_config()
  config.model.backbone = 'vgg'
  with pytest.raises(ValueError, match='backbone'):
    models.build_model(config.model, topology)
  config = tiny.get_config()
  config.model.vertex_attention = 'middle'
  model = models.build_model(config.model, topology)
  with pytest.raises(ValueError, match='vertex_attention'):
    abstract_variables(model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  config = tiny.get_config()
  config.model.upsample_init = 'smooth'
  model = models.build_model(config.model, topology)
  with pytest.raises(ValueError, match="upsample_init .*'smooth'"):
    abstract_variables(model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


class _MeshHead(nn.Module):
  """The shared mesh head alone: coarse [B, 431, 3] -> mesh outputs."""

  topology: object
  upsample_init: str

  @nn.compact
  def __call__(self, coarse):
    b = coarse.shape[0]
    return fastmetro.mesh_outputs(
        self.topology,
        jnp.zeros((b, 3)),
        jnp.zeros((b, 14, 3)),
        coarse,
        jnp.float32,
        self.upsample_init,
    )


def test_hierarchy_upsample_init_starts_at_the_mesh_hierarchy(topology):
  coarse = jax.random.normal(jax.random.key(0), (2, topology.num_vertices[2], 3))
  dense = topology.upsample_matrix(1)  # [1723, 431]
  head = _MeshHead(topology, 'hierarchy')
  variables = head.init(jax.random.key(1), coarse)
  layer = variables['params']['coarse2intermediate_upsample']
  np.testing.assert_array_equal(layer['kernel'], dense.T.astype(np.float32))
  np.testing.assert_array_equal(layer['bias'], 0)
  out = head.apply(variables, coarse)
  np.testing.assert_allclose(
      out['pred_3d_vertices_intermediate'],
      np.einsum('uc,bcd->bud', dense, np.asarray(coarse)),
      atol=1e-5,
  )
  # The paper's init is PyTorch's nn.Linear: U(+-1/sqrt(431)), not the hierarchy.
  random = _MeshHead(topology, 'random').init(jax.random.key(1), coarse)
  kernel = np.asarray(random['params']['coarse2intermediate_upsample']['kernel'])
  assert np.abs(kernel).max() <= 1 / math.sqrt(topology.num_vertices[2])
  assert np.abs(kernel - dense.T).max() > 0.5


# ---------------------------------------------------------------------------
# Building blocks against NumPy references.


def test_sine_position_encoding_matches_formula():
  h, w, dim = 3, 5, 8
  pe = tfm.sine_position_encoding(h, w, dim)
  feats = dim // 2
  ref = np.zeros((h * w, dim))
  for i in range(h):
    for j in range(w):
      y = (i + 1) / (h + 1e-6) * 2 * math.pi
      x = (j + 1) / (w + 1e-6) * 2 * math.pi
      for k in range(feats):
        t = 10000 ** (2 * (k // 2) / feats)
        f = math.sin if k % 2 == 0 else math.cos
        ref[i * w + j, k] = f(y / t)
        ref[i * w + j, feats + k] = f(x / t)
  np.testing.assert_allclose(pe, ref, atol=1e-6)


def test_multihead_attention_matches_numpy():
  b, lq, lk, e, heads = 2, 5, 7, 12, 3
  rng = np.random.default_rng(0)
  q_in, k_in, v_in = (rng.normal(size=(b, n, e)).astype(np.float32) for n in (lq, lk, lk))
  mask = rng.random((lq, lk)) > 0.3
  mask[:, 0] = True
  mha = tfm.MultiHeadAttention(heads)
  variables = mha.init(jax.random.key(0), q_in, k_in, v_in, mask)
  variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), variables)
  out, state = mha.apply(variables, q_in, k_in, v_in, mask, mutable=['intermediates'])
  p = variables['params']
  w_in, b_in = np.asarray(p['in_proj']['kernel']), np.asarray(p['in_proj']['bias'])
  q, k, v = (
      x @ w_in[:, i * e : (i + 1) * e] + b_in[i * e : (i + 1) * e]
      for i, x in enumerate((q_in, k_in, v_in))
  )
  hd = e // heads
  split = lambda x: x.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(hd)
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  ref = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(b, lq, e)
  ref = ref @ np.asarray(p['out_proj']['kernel']) + np.asarray(p['out_proj']['bias'])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state['intermediates']['attention_weights'][0], weights, atol=1e-5)


def test_token_linear_equals_torch_layout_product():
  x = np.random.default_rng(1).normal(size=(2, 6, 3)).astype(np.float32)
  layer = tfm.TokenLinear(4)
  variables = layer.init(jax.random.key(0), x)
  w = np.asarray(variables['params']['kernel']).T  # torch weight [out, in]
  bias = np.asarray(variables['params']['bias'])
  ref = np.einsum('oi,bic->boc', w, x) + bias[None, :, None]
  np.testing.assert_allclose(layer.apply(variables, x), ref, atol=1e-5)


@pytest.mark.parametrize('height,width', [(8, 8), (7, 9)])
def test_sliced_max_pool_equals_flax_max_pool(height, width):
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))  # no ties
  reference = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(resnet.max_pool_3x3_s2(x), reference(x))
  weights = jax.random.normal(jax.random.key(1), reference(x).shape)
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * weights))(x)
  np.testing.assert_allclose(grad(resnet.max_pool_3x3_s2), grad(reference), atol=1e-6)


def test_zero_init_residual_blocks_start_as_identity():
  # torchvision's zero_init_residual: bn3's scale starts at 0, so a block
  # without projection maps its (post-ReLU, non-negative) input to itself.
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 5, 5, 8)))  # [B, H, W, 4 * planes]
  for zero_init in (True, False):
    block = resnet.Bottleneck(planes=2, zero_init_residual=zero_init)
    variables = block.init(jax.random.key(1), x, train=False)
    scale = variables['params']['bn3']['scale']
    np.testing.assert_array_equal(scale, np.zeros(8) if zero_init else np.ones(8))
    out = block.apply(variables, x, train=False)
    assert np.array_equal(out, x) == zero_init
  net = models.build_backbone(tiny.get_config().model.copy_and_resolve_references())
  assert not net.zero_init_residual  # the default, as torchvision and FastMETRO


def test_max_pool_gradient_goes_to_the_first_maximum():
  # 3 x 3 input, 2 x 2 output. Window (0, 0) covers rows/cols 0-1: the ties at
  # (0, 1) and (1, 0) give it to (0, 1), first in row-major order (PyTorch).
  x = jnp.array([[0.0, 5.0, 1.0], [5.0, 2.0, 7.0], [3.0, 7.0, 7.0]])[None, :, :, None]
  out, vjp = jax.vjp(resnet.max_pool_3x3_s2, x)
  np.testing.assert_array_equal(out[0, :, :, 0], [[5.0, 7.0], [7.0, 7.0]])
  (grad,) = vjp(jnp.array([[1.0, 10.0], [100.0, 1000.0]])[None, :, :, None])
  # Window (0, 1) and window (1, 1) (7s at (1, 2), (2, 1), (2, 2)) both choose
  # (1, 2); window (1, 0) chooses (2, 1).
  np.testing.assert_array_equal(
      grad[0, :, :, 0], [[0.0, 1.0, 0.0], [0.0, 0.0, 1010.0], [0.0, 100.0, 0.0]]
  )


def test_joint_masking_bounds():
  joints = jnp.ones((4000, 14, 8))
  out = coarsemetro.mask_joint_tokens(jax.random.key(3), joints, 0.2, 0.01)
  masked = np.asarray((out == 0.01).all(-1))
  per_sample = masked.sum(1)
  assert set(np.unique(per_sample)) == {0, 1, 2}  # floor(u * 0.2 * 14) in {0, 1, 2}
  np.testing.assert_allclose(np.bincount(per_sample) / 4000, [5 / 14, 5 / 14, 4 / 14], atol=0.03)
  assert np.all((np.asarray(out) == 1) | (np.asarray(out) == 0.01))
  # Every joint is masked equally often.
  assert masked.sum(0).min() > 0.6 * masked.sum(0).max()


# ---------------------------------------------------------------------------
# Compiled tiny model: eval determinism, train randomness, sharding.


@pytest.fixture(scope='module')
def tiny_model(topology):
  config = tiny.get_config()
  model = models.build_model(config.model, topology)
  images = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
  variables = jax.jit(
      lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
  )(images)
  # One compilation of each forward, shared by the tests below.
  forward = {train: jax.jit(_forward(model, train)) for train in (False, True)}
  return model, variables, images, forward


def _forward(model, train):
  """Un-jitted forward with rngs derived from one key."""

  def fn(variables, images, key):
    rngs = {'dropout': jax.random.fold_in(key, 0), 'joint_mask': jax.random.fold_in(key, 1)}
    if train:
      out, _ = model.apply(variables, images, train=True, rngs=rngs, mutable=['batch_stats'])
      return out
    return model.apply(variables, images, train=False, rngs=rngs)

  return fn


def test_eval_is_deterministic_and_train_is_random_given_rng(tiny_model):
  _, variables, images, forward = tiny_model
  eval_fn, train_fn = forward[False], forward[True]
  a = eval_fn(variables, images, jax.random.key(1))
  b = eval_fn(variables, images, jax.random.key(2))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = train_fn(variables, images, jax.random.key(1))
  d = train_fn(variables, images, jax.random.key(1))
  e = train_fn(variables, images, jax.random.key(2))
  for k in c:
    np.testing.assert_array_equal(c[k], d[k])
  assert not np.allclose(c['pred_3d_joints'], e['pred_3d_joints'])
  assert all(np.isfinite(np.asarray(v)).all() for v in a.values())


def test_fine_mesh_is_fixed_upsampling_of_intermediate(tiny_model, topology):
  _, variables, images, forward = tiny_model
  out = forward[False](variables, images, jax.random.key(0))
  dense = topology.upsample_matrix(0)
  np.testing.assert_allclose(
      out['pred_3d_vertices_fine'],
      np.einsum('vu,buc->bvc', dense, np.asarray(out['pred_3d_vertices_intermediate'])),
      atol=1e-5,
  )


def test_sharded_over_8_devices_equals_single_device(tiny_model):
  assert jax.device_count() == 8
  model, variables, images, forward = tiny_model
  fn = _forward(model, False)
  single = forward[False](variables, images, jax.random.key(0))
  device_mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.sharding.NamedSharding(device_mesh, jax.P('data'))
  replicated = jax.sharding.NamedSharding(device_mesh, jax.P())
  sharded_fn = jax.jit(fn, in_shardings=(replicated, batch, replicated), out_shardings=batch)
  sharded = sharded_fn(
      jax.device_put(variables, replicated), jax.device_put(images, batch), jax.random.key(0)
  )
  assert sharded['pred_3d_vertices_fine'].sharding.spec == jax.P('data')
  for k in single:
    np.testing.assert_allclose(sharded[k], single[k], atol=1e-5)


# ---------------------------------------------------------------------------
# Mesh hierarchy (real SMPL files when present).


def test_real_decoder_mask_has_3005_allowed_vertex_pairs(smpl_topology_dir):
  from coarsemetro_jax import mesh_topology

  derived = mesh_topology.load_topology(str(smpl_topology_dir / 'mesh_downsampling.npz'))
  mask = derived.decoder_attention_mask(14)
  assert mask.shape == (445, 445)
  assert mask[14:, 14:].sum() == 3005
  assert mask[:14].all() and mask[:, :14].all()
  from coarsemetro_jax.convert import adjacency

  from_files = mesh_topology.load_topology(
      str(smpl_topology_dir / 'mesh_downsampling.npz'),
      adjacency.read_adjmat(str(smpl_topology_dir / 'smpl_431_adjmat')),
  )
  np.testing.assert_array_equal(from_files.coarse_adjacency, derived.coarse_adjacency)


def test_real_hierarchy_gather_equals_dense_upsampling(smpl_topology_dir):
  from coarsemetro_jax import mesh_topology

  topo = mesh_topology.load_topology(str(smpl_topology_dir / 'mesh_downsampling.npz'))
  assert topo.num_vertices == (6890, 1723, 431)
  assert (topo.up_indices[0].shape, topo.up_indices[1].shape) == ((6890, 3), (1723, 3))
  x = np.random.default_rng(0).normal(size=(2, 431, 3))
  dense = topo.upsample_matrix(0) @ topo.upsample_matrix(1)
  np.testing.assert_allclose(
      topo.upsample(x, from_level=2), np.einsum('vu,buc->bvc', dense, x), atol=1e-5
  )
  # GraphCMR's first kept vertices (reference §3) and D as selections.
  np.testing.assert_array_equal(topo.down_indices[0][topo.down_indices[1]][:4], [5, 24, 83, 110])
  fine = np.random.default_rng(1).normal(size=(6890, 3))
  np.testing.assert_array_equal(
      topo.downsample(fine), fine[topo.down_indices[0][topo.down_indices[1]]]
  )
