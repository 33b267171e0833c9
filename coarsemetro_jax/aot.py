r"""Ahead-of-time compile of the train and eval steps for a TPU slice, from any machine.

  python -m coarsemetro_jax.aot --config=configs/r50.py --topology=v5e:4x4
  python -m coarsemetro_jax.aot --config=configs/h64.py --topology=v5e:4x4 \
      --config.model.compute_dtype=bfloat16 --config.param_sharding=fsdp
  python -m coarsemetro_jax.aot --config=configs/tiny.py --topology=cpu:8
  python -m coarsemetro_jax.aot --config=configs/hand_r50.py --topology=cpu:8

TPU topologies (`v5e:4x4`, `v5p:2x2x2`, `v4:2x2x1`, `v6e:16x16`, ...) need
libtpu (`pip install -r requirements-tpu.txt`), but no TPU: libtpu's
compile-only client describes the slice's devices, and XLA's TPU compiler
builds the real program for them. `cpu:N` runs the same path on N host CPU
devices; without --topology the local devices are used.

Over those devices the command builds the training's own device mesh, state
and batch shardings (steps.py) and lowers the real `train_step` and
`eval_step` for abstract inputs (no weights, no data): the state from
`jax.eval_shape`, the batch from the batch contract (data_pipelines/__init__.py)
at the global batch `--per_chip_batch` (default 16, the paper's images per
GPU) x chips; config.data.batch_size is not used. Per chip it prints the state's
bytes, XLA's buffer assignment (arguments, outputs, temporaries, and the
donated bytes the new state reuses), the peak against the chip's HBM, XLA's
FLOPs per step next to profile.py's analytic count, and the roofline step time
at the chip's peak bf16 rate: a lower bound, not a measurement.

Exit status: 0 when the compiled steps (--steps, default both) fit, 1 when
one does not (the sizes are printed), 2 for a bad flag, config or topology.
"""

import dataclasses
import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import body_model
from coarsemetro_jax import build
from coarsemetro_jax import compile_targets
from coarsemetro_jax import config_files
from coarsemetro_jax import hand_steps
from coarsemetro_jax import mirror
from coarsemetro_jax import profile
from coarsemetro_jax import steps

GB = compile_targets.GB
# The per-GPU batch of the paper's training (16 images per GPU).
PAPER_PER_CHIP_BATCH = 16
# Any positive value: the lr schedule's constants do not change the program's
# shapes, memory or FLOPs; only schedules that need an epoch length ask for one.
NOMINAL_STEPS_PER_EPOCH = 1000
STEP_NAMES = ('train', 'eval')


class AotError(ValueError):
  """A user's mistake: bad flag or config value (one line)."""


# ----------------------------------------------------------------------------
# Abstract inputs.


def _with_shardings(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def abstract_state(config, model, device_mesh, image_shape):
  """(TrainState of ShapeDtypeStructs with shardings, its sharding tree)."""
  state = jax.eval_shape(
      lambda key: steps.create_train_state(
          config, model, key, device_mesh, image_shape, steps_per_epoch=NOMINAL_STEPS_PER_EPOCH
      )[0],
      jax.random.key(config.seed),
  )
  sharding = steps.state_sharding(state, device_mesh, config.param_sharding, config.fsdp_min_size)
  return _with_shardings(state, sharding), sharding


def abstract_batch(batch_size, image_size, image_dtype, sharding, hand=False):
  """The batch dict of data_pipelines/__init__.py as ShapeDtypeStructs [B, ...] (a hand's)."""
  f32 = jnp.float32
  shapes = {
      'image': ((image_size, image_size, 3), jnp.dtype(image_dtype)),
      'joints_2d': ((24, 3), f32),
      'joints_3d': ((24, 4), f32),
      'pose': ((72,), f32),
      'betas': ((10,), f32),
      'has_2d_joints': ((), f32),
      'has_3d_joints': ((), f32),
      'has_smpl': ((), f32),
      'mask': ((), f32),
  }
  if hand:
    shapes.update({k: (shape, f32) for k, shape in hand_steps.LABEL_SHAPES.items()})
  return {
      k: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
      for k, (shape, dtype) in shapes.items()
  }


def shard_bytes(tree):
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


# ----------------------------------------------------------------------------
# Compile and measure.


@dataclasses.dataclass
class StepFigures:
  """XLA's figures for one device of a compiled step (bytes, FLOPs)."""

  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  generated_code: int
  flops: float

  @property
  def peak(self):
    # Donated arguments are reused for outputs (`aliased`); XLA's buffer
    # assignment is static, so this is the executable's exact peak.
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @classmethod
  def of(cls, compiled):
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
      cost = cost[0]
    return cls(
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.temp_size_in_bytes,
        m.alias_size_in_bytes,
        m.generated_code_size_in_bytes,
        float(cost.get('flops', float('nan'))),
    )


@dataclasses.dataclass
class Report:
  """What the command prints; byte and FLOP figures are per device."""

  target: compile_targets.Target
  per_chip_batch: int
  global_batch: int
  params: int
  opt_state: int
  batch_stats: int
  batch: int
  steps: dict[str, StepFigures]
  analytic_forward_flops: float  # per image, profile.py (1 multiply-add = 2 FLOPs)

  def per_chip(self, n):
    return n * self.target.devices_per_chip

  def needed(self):
    """The largest step's peak bytes per chip."""
    return max(self.per_chip(s.peak) for s in self.steps.values())

  def fits(self):
    """Whether every step fits the chip's HBM; None without an HBM figure."""
    chip = self.target.chip
    if chip is None or not np.isfinite(chip.hbm_bytes):
      return None
    return self.needed() <= chip.hbm_bytes


class DoesNotFit(RuntimeError):
  """XLA refused to compile a step for lack of device memory."""


def compile_steps(config, target, per_chip_batch, step_names=STEP_NAMES):
  """Lowers and compiles the steps `step_names` for `target`; returns a Report."""
  global_batch = per_chip_batch * target.num_chips
  if global_batch % len(target.devices):
    raise AotError(
        f'--per_chip_batch={per_chip_batch} x {target.num_chips} chips = '
        f'{global_batch} does not split over {len(target.devices)} devices'
    )
  group = config.bn_group_size
  if group and global_batch > group and global_batch % group:
    raise AotError(
        f'global batch {global_batch} is not a multiple of ' f'config.bn_group_size {group}'
    )
  try:
    topology, body, model = build.build(config)
  except ValueError as e:  # a config value out of its choices
    raise AotError(compile_targets.first_line(e)) from e
  image_size = config.data.image_size
  device_mesh = steps.make_device_mesh(target.devices)
  repl = steps.replicated(device_mesh)
  state, state_sharding = abstract_state(config, model, device_mesh, (image_size, image_size, 3))
  batch_sharding = steps.batch_sharding(device_mesh)
  hand = build.is_hand(config)
  batch = abstract_batch(global_batch, image_size, config.data.image_dtype, batch_sharding, hand)
  body_abstract = _with_shardings(body, jax.tree.map(lambda _: repl, body))
  step_lib = hand_steps if hand else steps

  def lowered(name):
    if name == 'train':
      rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=repl)
      step = step_lib.jit_train_step(config, model, topology, state_sharding, batch_sharding)
      return step.lower(state, batch, rng, body_abstract)
    if hand:  # the hand's flip test permutes nothing
      step = hand_steps.jit_eval_step(
          config, model, topology, state_sharding, batch_sharding, config.eval_flip
      )
      return step.lower(state, batch, body_abstract)
    flip_perm = None
    if config.eval_flip:
      flip_perm = mirror.mirror_permutation(body.v_template)
    step = steps.jit_eval_step(config, model, topology, state_sharding, batch_sharding, flip_perm)
    return step.lower(state, batch, body_abstract)

  figures = {}
  for name in step_names:
    try:
      figures[name] = StepFigures.of(lowered(name).compile())
    except Exception as e:
      # XLA:TPU reports a program larger than HBM as RESOURCE_EXHAUSTED.
      if 'RESOURCE_EXHAUSTED' in str(e):
        raise DoesNotFit(f'{name} step on {target.name}: {compile_targets.first_line(e)}') from e
      raise
  counts = profile.profile_model(model, image_size)
  return Report(
      target=target,
      per_chip_batch=per_chip_batch,
      global_batch=global_batch,
      params=shard_bytes(state.params),
      opt_state=shard_bytes(state.opt_state),
      batch_stats=shard_bytes(state.batch_stats),
      batch=shard_bytes(batch),
      steps=figures,
      analytic_forward_flops=2 * counts['total_gflops'] * 1e9,
  )


# ----------------------------------------------------------------------------
# Output.


def _size(n):
  return f'{n / GB:.2f} GB' if n >= 0.1 * GB else f'{n / 1e6:.1f} MB'


def _flops(n):
  return f'{n / 1e12:.3f} TFLOP' if n >= 1e11 else f'{n / 1e9:.2f} GFLOP'


def analytic_flops(report, name, eval_flip=False):
  """profile.py's count for one chip's step: train = 3 x forward (backward = 2 x)."""
  per_image = report.analytic_forward_flops * (3 if name == 'train' else 1)
  return per_image * report.per_chip_batch * (2 if name == 'eval' and eval_flip else 1)


def format_report(report, config):
  """The per-chip table as text."""
  t, chip = report.target, report.target.chip
  pc = report.per_chip
  hbm = chip.hbm_bytes if chip else float('nan')
  peak_flops = chip.peak_bf16_flops if chip else float('nan')
  lines = [
      f'{t.name}: {len(t.devices)} devices, {t.num_chips} chips'
      + (f' of {chip.name}' if chip else '')
      + (f' ({t.devices_per_chip} devices per chip)' if t.devices_per_chip > 1 else ''),
      (
          f'{profile.model_label(config)}, compute {config.model.compute_dtype}, params '
          f'{config.param_sharding}, {report.per_chip_batch} images per chip x '
          f'{t.num_chips} = global batch {report.global_batch}, {config.data.image_size} px'
      ),
      '',
      'per chip:',
      f'  parameters           {_size(pc(report.params))}',
      f'  optimizer state      {_size(pc(report.opt_state))}',
      f'  BatchNorm statistics {_size(pc(report.batch_stats))}',
      f'  batch                {_size(pc(report.batch))}',
  ]
  for name, s in report.steps.items():
    total = pc(s.peak)
    against = (
        f' of {_size(hbm)} HBM ({100 * total / hbm:.0f} %)'
        if np.isfinite(hbm)
        else ' (no HBM figure for this device)'
    )
    xla, analytic = pc(s.flops), analytic_flops(report, name, config.eval_flip)
    lines += [
        f'  {name} step:',
        (
            f'    arguments {_size(pc(s.arguments))}, outputs {_size(pc(s.outputs))}, '
            f'temporaries {_size(pc(s.temporaries))}, donated and reused '
            f'{_size(pc(s.aliased))}'
        ),
        f'    total     {_size(total)}{against}',
        f'    FLOPs     {_flops(xla)} (XLA); {_flops(analytic)} analytic '
        '(profile.py: convolutions and matmuls, 2 per multiply-add'
        + (', backward = 2 x forward)' if name == 'train' else ')'),
    ]
    if np.isfinite(peak_flops):
      seconds = xla / peak_flops
      lines.append(
          f'    roofline  >= {seconds * 1e3:.2f} ms per step, <= '
          f'{report.global_batch / seconds:,.0f} images/s at {peak_flops / 1e12:.0f} '
          'TFLOP/s bf16 peak (lower bound, not a measurement)'
      )
  if not np.isfinite(peak_flops):
    lines.append('  roofline: no published peak for this device (--peak_tflops sets one)')
  fits = report.fits()
  if fits is not None:
    verdict = 'fits' if fits else 'DOES NOT FIT'
    lines += ['', f'{verdict}: {_size(report.needed())} needed per chip, {_size(hbm)} HBM']
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Command line.


def define_flags(flag_values, argv):
  """The command's flags on `flag_values` (its own FlagValues: no global state).

  `argv` names the --config.* overrides to accept.
  """
  config_files.define_flag(
      'config', 'Training config file.', flag_values=flag_values, sys_argv=argv
  )
  flags.DEFINE_string(
      'topology',
      '',
      "'v5e:4x4'-style TPU slice (needs libtpu), " "'cpu:N', or empty for the local devices.",
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'per_chip_batch',
      PAPER_PER_CHIP_BATCH,
      'Training images per chip; the global batch is this x chips.',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'steps', list(STEP_NAMES), 'Steps to compile (train, eval).', flag_values=flag_values
  )
  flags.DEFINE_float(
      'peak_tflops',
      0.0,
      'Peak bf16 TFLOP/s per chip for the roofline ' '(default: the published figure of the chip).',
      flag_values=flag_values,
  )


def parse(argv):
  """(config, topology, per_chip_batch, peak_tflops, steps) from argv; AotError if bad."""
  fv = flags.FlagValues()
  try:
    define_flags(fv, argv)
    fv(argv)
    config = fv['config'].value
    if config is not None:
      config.keys()  # a config file that failed to load raises here
  except (KeyError, AttributeError) as e:
    raise AotError(
        'a --config.* override names a key the config does not have: '
        f'{compile_targets.first_line(e)}'
    ) from e
  except (flags.Error, ValueError, OSError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # A config file's own error is the last line of ml_collections' traceback.
    raise AotError(
        ' '.join(lines[:1] + lines[-1:]) if len(lines) > 1 else compile_targets.first_line(e)
    ) from e
  if config is None:
    raise AotError('--config is required (e.g. --config=configs/r50.py)')
  if fv.per_chip_batch < 1:
    raise AotError(f'--per_chip_batch must be >= 1, got {fv.per_chip_batch}')
  unknown = sorted(set(fv.steps) - set(STEP_NAMES))
  if unknown or not fv.steps:
    raise AotError(f'--steps must name some of {list(STEP_NAMES)}, got {fv.steps}')
  return config, fv.topology, fv.per_chip_batch, fv.peak_tflops, tuple(fv.steps)


def main(argv):
  """Runs the command; returns the exit status."""
  try:
    config, topology, per_chip_batch, peak_tflops, step_names = parse(argv)
    target = compile_targets.make_target(topology, peak_tflops)
    report = compile_steps(config, target, per_chip_batch, step_names)
  except (AotError, compile_targets.TargetError, body_model.BodyModelError) as e:
    print(f'aot: {e}', file=sys.stderr)
    return 2
  except DoesNotFit as e:
    print(f'DOES NOT FIT: {e}')
    return 1
  print(format_report(report, config))
  return 0 if report.fits() is not False else 1


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
