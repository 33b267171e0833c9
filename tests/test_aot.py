"""coarsemetro_jax/aot.py: compile the tiny config's real steps for 8 CPU devices and a TPU slice."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coarsemetro_jax import aot
from coarsemetro_jax import compile_targets
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import models
from coarsemetro_jax import steps
from configs import tiny

PER_CHIP_BATCH = 2
# XLA counts every operation of the step (element-wise ops, BatchNorm, losses,
# the body model, AdamW, and on XLA:CPU the integer operations of the dropout
# masks' threefry hash, 20 rounds of add, rotate and xor: models/dropout.py);
# profile.py counts the model's convolutions and matmuls only, times 3 for
# forward and backward. For the tiny config the hash is a large share, so
# XLA's count must lie between the analytic one and this many times it
# (3.9x on cpu:8 with the hash; under 3x while the hash was a loop XLA counted once).
FLOPS_FACTOR = 5.0


def leaf_bytes(tree):
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tiny_params_bytes(config):
  model = models.build_model(config.model, mesh_topology.load_topology())
  size = config.data.image_size
  variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)
  )
  return leaf_bytes(variables['params'])


def check_report(report, config, devices):
  """The figures are positive and add up; FLOPs near the analytic count."""
  params = tiny_params_bytes(config)
  assert report.target.num_chips * report.target.devices_per_chip == devices
  assert report.global_batch == PER_CHIP_BATCH * report.target.num_chips
  # Replicated: every device holds all parameters, and AdamW two moments of each.
  assert report.params == params
  assert report.opt_state >= 2 * params
  image = config.data.image_size**2 * 3 * 4
  assert report.batch == (image + (24 * 3 + 24 * 4 + 72 + 10 + 4) * 4) * (
      report.global_batch // devices
  )
  train, eval_ = report.steps['train'], report.steps['eval']
  state = report.params + report.opt_state + report.batch_stats
  # jit drops arguments a step does not read: eval reads no optimizer state.
  assert train.arguments >= state + report.batch
  assert report.params + report.batch <= eval_.arguments < state + report.batch
  for step in (train, eval_):
    assert step.temporaries > 0 and step.outputs > 0
    assert 0 < step.peak <= step.arguments + step.outputs + step.temporaries
  # The train step donates the state: its new state reuses those buffers.
  assert train.aliased == state + 4  # + the int32 step counter
  assert eval_.aliased == 0
  analytic = aot.analytic_flops(report, 'train')
  assert analytic <= report.per_chip(train.flops) <= FLOPS_FACTOR * analytic


def needs_libtpu(monkeypatch):
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (requirements-tpu.txt)')
  # Compiling takes no TPU: another libtpu process (a parallel test, an aot
  # run) may hold libtpu's lock meanwhile.
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def test_tiny_compiles_for_8_cpu_devices():
  config = tiny.get_config()
  target = compile_targets.make_target('cpu:8')
  report = aot.compile_steps(config, target, PER_CHIP_BATCH)
  assert target.chip is None and report.fits() is None
  check_report(report, config, 8)
  text = aot.format_report(report, config)
  assert 'per chip:' in text and 'no HBM figure' in text


def test_fsdp_shards_params_and_optimizer_state():
  config = tiny.get_config()
  config.param_sharding = 'fsdp'
  config.fsdp_min_size = 2**10
  target = compile_targets.make_target('cpu:8')
  state, _ = aot.abstract_state(
      config,
      models.build_model(config.model, mesh_topology.load_topology()),
      steps.make_device_mesh(target.devices),
      (64, 64, 3),
  )
  full = leaf_bytes(state.params)
  sharded = aot.shard_bytes(state.params)
  large = sum(
      int(np.prod(x.shape)) * 4
      for x in jax.tree.leaves(state.params)
      if np.prod(x.shape) >= config.fsdp_min_size and any(d % 8 == 0 for d in x.shape)
  )
  assert sharded == full - large + large // 8


def test_tiny_compiles_for_a_v5e_slice(monkeypatch):
  needs_libtpu(monkeypatch)
  config = tiny.get_config()
  target = compile_targets.make_target('v5e:2x2')
  assert target.chip is compile_targets.CHIPS['v5e'] and target.num_chips == 4
  report = aot.compile_steps(config, target, PER_CHIP_BATCH)
  assert report.fits() is True
  assert report.params == tiny_params_bytes(config)
  for step in report.steps.values():
    assert step.temporaries > 0 and step.arguments >= report.params + report.batch
  text = aot.format_report(report, config)
  assert 'lower bound, not a measurement' in text and 'fits' in text


@pytest.mark.parametrize(
    'name, devices, chips, kind',
    [
        ('v4:2x2x1', 8, 4, 'v4'),  # two TensorCores (devices) per v4 chip
        ('v5p:2x2x2', 8, 8, 'v5p'),
        ('v5e:4x4', 16, 16, 'v5e'),
        ('v6e:4x4', 16, 16, 'v6e'),
    ],
)
def test_tpu_topologies_count_chips(name, devices, chips, kind, monkeypatch):
  needs_libtpu(monkeypatch)
  target = compile_targets.make_target(name)
  assert len(target.devices) == devices and target.num_chips == chips
  assert target.chip is compile_targets.CHIPS[kind]


def test_local_devices_without_topology():
  target = compile_targets.make_target('')
  assert len(target.devices) == jax.device_count() and target.devices_per_chip == 1
  assert target.chip is None  # CPU: no published HBM or peak
  assert compile_targets.make_target('', peak_tflops=2.0).chip.peak_bf16_flops == 2e12


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--topology=cpu:0'], "expected 'cpu:N'"),
        (['--topology=cpu:64'], 'xla_force_host_platform_device_count=64'),
        (['--per_chip_batch=0'], 'per_chip_batch must be >= 1'),
        (['--config.model.no_such_key=1'], 'no_such_key'),
        (['--no_such_flag=1'], 'no_such_flag'),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
  assert aot.main(['aot', '--config=configs/tiny.py', *argv]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_missing_config_is_one_line(capsys):
  assert aot.main(['aot', '--topology=cpu:8']) == 2
  assert '--config is required' in capsys.readouterr().err


def test_unknown_tpu_topology_is_one_line(capsys):
  assert aot.main(['aot', '--config=configs/tiny.py', '--topology=v9x:2x2']) == 2
  err = capsys.readouterr().err
  assert '--topology=v9x:2x2' in err and len(err.strip().splitlines()) == 1
