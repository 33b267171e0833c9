"""HRNet backbone: full-size accounting (eval_shape / meta tensors), PyTorch parity, kinds.

Full-size W64 checks never run the network: Flax shapes come from
`jax.eval_shape`, PyTorch shapes from the reference on torch's 'meta' device.
Numerical parity runs a reduced HRNet (width 8, fewer modules/blocks, narrow
head) at 64 px. Set COARSEMETRO_W64_PARITY=1 for the same parity check on the
real HRNet-W64 at 224 px (about a minute on a CPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax.convert import __main__ as cli
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.models import hrnet
from configs import fastmetro as fastmetro_config
from configs import h64
from configs import r50

# HRNet-W64's ImageNet state dict (classifier included).
W64_KEYS, W64_PARAMS = 1956, 128_059_944
CLASSIFIER_PARAMS = 2048 * 1000 + 1000
W64_KEY_GROUPS = {
    'layer1': 78,
    'transition1': 12,
    'stage2': 108,
    'transition2': 6,
    'stage3': 744,
    'transition3': 6,
    'stage4': 864,
    'incre_modules': 96,
    'downsamp_modules': 21,
    'final_layer': 7,
    'classifier': 2,
}
# FastMETRO-L-H64's released state dict.
FASTMETRO_L_H64_KEYS, FASTMETRO_L_H64_PARAMS = 2161, 153_739_838
# A CPU-sized HRNet with every structural feature: 2-4 branches, chained
# modules, multi-step down-fuses, incre downsample shortcuts.
SMALL = dict(
    stem_width=16,
    stage_modules=(1, 2, 1),
    num_blocks=2,
    head_channels=(8, 16, 32, 64),
    final_channels=64,
)
# The smallest HRNet (one module, one block), for the remat gradient check.
TINY = dict(
    stem_width=8,
    stage_modules=(1, 1, 1),
    num_blocks=1,
    head_channels=(4, 8, 8, 8),
    final_channels=16,
)


def _param_count(shapes):
  return sum(
      int(np.prod(s))
      for k, s in shapes.items()
      if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
  )


def _abstract(module, size):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
  return {c: dict(variables[c]) for c in ('params', 'batch_stats')}


def _torch_reference(torch, width=64, meta=True, **structure):
  from torch_reference import hrnet as torch_hrnet

  with torch.device('meta' if meta else 'cpu'):
    return torch_hrnet.HRNet(width, **structure)


@pytest.fixture(scope='module')
def w64_init():
  """(output, variables) of HRNet-W64's init on a [2, 224, 224, 3] batch, as shapes."""
  model = hrnet.HRNet(width=64)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), images)
  return out, {c: dict(variables[c]) for c in ('params', 'batch_stats')}


@pytest.fixture(scope='module')
def w64_variables(w64_init):
  return w64_init[1]


def test_w64_output_and_param_count(w64_init, w64_variables):
  out, _ = w64_init
  assert out.shape == (2, 7, 7, 2048) and hrnet.HRNet(width=64).out_channels == 2048
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(w64_variables['params']))
  assert n == W64_PARAMS - CLASSIFIER_PARAMS == 126_010_944


def test_w32():
  """Same head (2048 x 7 x 7); HRNet-W32-C's 41.2M parameters less the classifier."""
  width, params = 32, 41_232_680 - CLASSIFIER_PARAMS
  variables = _abstract(hrnet.HRNet(width=width), 224)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == params
  shapes = state_dict_lib.torch_shapes(
      tables.hrnet_backbone_table(width, '', 'backbone/'),
      {c: {'backbone': v} for c, v in variables.items()},
  )
  assert shapes['stage4.2.branches.3.3.conv2.weight'] == (8 * width, 8 * width, 3, 3)
  assert shapes['final_layer.0.weight'] == (2048, 1024, 1, 1)


def test_w64_imagenet_table_matches_torch_state_dict(w64_variables):
  """The converter's hrnet-w64-imagenet table against the reference's state dict."""
  torch = pytest.importorskip('torch')
  reference = {k: tuple(v.shape) for k, v in _torch_reference(torch).state_dict().items()}
  assert len(reference) == W64_KEYS and _param_count(reference) == W64_PARAMS
  for group, count in W64_KEY_GROUPS.items():
    assert sum(k.split('.')[0] == group for k in reference) == count, group

  config, scope = kinds.apply_kind('hrnet-w64-imagenet', r50.get_config())
  table = tables.model_table(config.model, scope)
  target = {c: {'backbone': v} for c, v in w64_variables.items()}  # as abstract_variables
  expected = state_dict_lib.torch_shapes(table, target)
  # Every Flax leaf is filled exactly once ...
  leaves, _ = tables.expand(table)
  flax_leaves = {(c, p) for c in target for p in state_dict_lib.flatten(target[c])}
  assert {(leaf.collection, leaf.flax) for leaf in leaves} == flax_leaves
  assert len(leaves) == len(flax_leaves)
  # ... and the only torch keys left over are the (carried) classifier.
  assert set(reference) - set(expected) == {'classifier.weight', 'classifier.bias'}
  assert all(
      tables.carrying_module(k, table) == 'classifier'
      for k in ('classifier.weight', 'classifier.bias')
  )
  assert {k: reference[k] for k in expected} == dict(expected)
  assert list(expected) == [k for k in reference if k in expected]  # state-dict order
  assert kinds.detect_kind(list(reference), r50.get_config()) == 'hrnet-w64-imagenet'


def _fastmetro_reference_shapes(torch, model_config):
  from torch_reference import build
  from torch_reference import fastmetro

  m = model_config
  with torch.device('meta'):
    backbone = _torch_reference(torch, m.hrnet_width)
    mask, upsample = build.placeholder_tensors(mesh_topology.SMPL_LEVELS, m.num_joints)
    model = fastmetro.FastMETRO(
        backbone,
        backbone.out_channels,
        mask,
        upsample,
        num_layers=m.fastmetro_layers,
        dims=tuple(m.fastmetro_dims),
        ffn_dims=tuple(m.fastmetro_ffn_dims),
        heads=m.num_heads,
        num_joints=m.num_joints,
        dropout=m.dropout,
    )
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_fastmetro_l_h64_accounting():
  torch = pytest.importorskip('torch')
  config = fastmetro_config.get_config('L-h64')
  reference = _fastmetro_reference_shapes(torch, config.model)
  assert len(reference) == FASTMETRO_L_H64_KEYS
  assert _param_count(reference) == FASTMETRO_L_H64_PARAMS
  table = tables.model_table(config.model)
  target = kinds.abstract_variables(config)
  expected = state_dict_lib.torch_shapes(table, target)
  leaves, _ = tables.expand(table)
  assert len(leaves) == sum(len(state_dict_lib.flatten(target[c])) for c in target)
  assert set(reference) - set(expected) == {
      'backbone.classifier.weight',
      'backbone.classifier.bias',
  }
  assert {k: reference[k] for k in expected} == dict(expected)
  # The converter recognises the file from its keys alone.
  assert kinds.detect_kind(list(reference), r50.get_config()) == 'fastmetro-L-h64'


def test_detect_coarsemetro_h64():
  config = h64.get_config()
  assert kinds.kind_of(config.model) == 'coarsemetro-S-h64'
  keys = tables.torch_keys(tables.model_table(config.model))
  assert 'backbone.stage4.2.fuse_layers.3.0.2.0.weight' in keys
  assert (
      kinds.detect_kind(keys + ['backbone.classifier.weight'], r50.get_config())
      == 'coarsemetro-S-h64'
  )


def test_h64_config_builds_hrnet_w64():
  config = h64.get_config()
  backbone = models.build_backbone(config.model)
  assert isinstance(backbone, hrnet.HRNet) and backbone.width == 64
  assert config.model.name == 'coarsemetro' and config.data.image_size == 224


def _converted_small(torch, seed=0, structure=None, size=64):
  """A random small PyTorch HRNet and its conversion into Flax variables."""
  from torch_reference import random_init

  structure = structure or SMALL
  reference = random_init.randomize_(_torch_reference(torch, 8, meta=False, **structure), seed)
  model = hrnet.HRNet(width=8, **structure)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  table = tables.hrnet_backbone_table(8, '', '', **structure)
  variables, report = state_dict_lib.to_flax(state, table, _abstract(model, size))
  assert not report.ignored
  assert {k for k in report.carried if not k.endswith('num_batches_tracked')} == {
      'classifier.weight',
      'classifier.bias',
  }
  return reference, model, variables


def test_small_parity_eval_and_train():
  torch = pytest.importorskip('torch')
  reference, model, variables = _converted_small(torch)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2))

  reference.eval()
  with torch.no_grad():
    want = reference(x_torch).numpy().transpose(0, 2, 3, 1)  # [2, 2, 2, 64]
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  assert got.shape == want.shape == (2, 2, 2, 64)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  # Training mode: batch statistics in the forward pass, running means updated
  # with PyTorch's momentum 0.1 (the variances differ: PyTorch's are unbiased).
  reference.train()
  with torch.no_grad():
    want = reference(x_torch).numpy().transpose(0, 2, 3, 1)
  got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  for key, path in (
      ('stage3.0.fuse_layers.2.0.1.1', ('stage3_0', 'fuse_layers_2_0_1_1')),
      ('incre_modules.3.0.downsample.1', ('incre_modules_3_0', 'downsample_1')),
  ):
    mean = updates['batch_stats'][path[0]][path[1]]['mean']
    np.testing.assert_allclose(
        np.asarray(mean),
        reference.get_submodule(key).running_mean.numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_remat_keeps_variables_and_checkpoints_every_block():
  """remat=True: the same variable tree, and each HighResolutionModule and Bottleneck is
  one rematerialised region of the gradient (traced only; compiling costs ~20 s)."""
  model, remat = (hrnet.HRNet(width=8, remat=r, **TINY) for r in (False, True))
  variables = _abstract(model, 32)
  assert jax.tree.structure(_abstract(remat, 32)) == jax.tree.structure(variables)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def grad_jaxpr(module):
    def loss(params, stats, x):
      out, _ = module.apply(
          {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
      )
      return jnp.mean(out**2)

    return jax.make_jaxpr(jax.grad(loss))(variables['params'], variables['batch_stats'], images)

  def count_remat(jaxpr):  # jax.checkpoint regions ('remat2' in jax 0.10), nested included
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name in ('remat2', 'checkpoint')
      for param in eqn.params.values():
        inner = getattr(param, 'jaxpr', param)
        if hasattr(inner, 'eqns'):
          n += count_remat(inner)
    return n

  stages = sum(TINY['stage_modules'])
  bottlenecks = TINY['num_blocks'] + len(TINY['head_channels'])  # layer1 + incre_modules
  assert count_remat(grad_jaxpr(model).jaxpr) == 0
  assert count_remat(grad_jaxpr(remat).jaxpr) == stages + bottlenecks


def test_cli_converts_hrnet_imagenet_file(tmp_path, capsys):
  """`--kind hrnet-w8-imagenet`: the full structure at width 8 (a ~42 MB file)."""
  torch = pytest.importorskip('torch')
  from torch_reference import random_init

  reference = random_init.randomize_(_torch_reference(torch, 8, meta=False), seed=2)
  src, out = tmp_path / 'hrnet_w8.pth', tmp_path / 'jax'
  torch.save(reference.state_dict(), src)
  code = cli.main(['--src', str(src), '--out', str(out), '--kind', 'hrnet-w8-imagenet'])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert 'hrnet-w8-imagenet (backbone only' in captured.out

  converted = [
      k
      for k in reference.state_dict()
      if not k.endswith('num_batches_tracked') and not k.startswith('classifier')
  ]
  n = sum(v.numel() for k, v in reference.named_parameters() if not k.startswith('classifier'))
  assert f'| **total** | {len(converted)} | {n:,} |' in captured.out
  assert (
      'carried 2 source tensors with no Flax counterpart (2,049,000 values; kept with the '
      'checkpoint, written back by --to-torch): classifier.weight, classifier.bias'
  ) in captured.out
  assert out.is_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get('COARSEMETRO_W64_PARITY'),
    reason='set COARSEMETRO_W64_PARITY=1 (HRNet-W64 at 224 px on CPU)',
)
def test_w64_parity():
  torch = pytest.importorskip('torch')
  from torch_reference import random_init

  reference = random_init.randomize_(_torch_reference(torch, 64, meta=False), seed=4).eval()
  model = hrnet.HRNet(width=64)
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  variables, _ = state_dict_lib.to_flax(
      state, tables.hrnet_backbone_table(64, '', ''), _abstract(model, 224)
  )
  images = np.random.default_rng(4).standard_normal((1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'HRNet-W64 224px: max |jax - torch| / max |torch| = {err:.2e}')
  assert err < 1e-4
