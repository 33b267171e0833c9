"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Order of initialisation (idempotent restarts, as big_vision):
  1. the latest checkpoint in `workdir/checkpoints` (preemption-safe resume);
  2. else `config.init_from` (a converted PyTorch checkpoint: whole model, or
     backbone-only ImageNet weights);
  3. else scratch.
Every input (the data, the body model, the topology, init_from) is checked
first (`check_inputs`), before anything is rendered, built or compiled.
Data: `config.data.source` is 'tsv' (`train_yaml` / `eval_yaml`, METRO TSV),
'tfds', or 'synthetic': the embedded synthetic dataset, rendered as a step of
its own into a directory under `config.data.synthetic.dir` unless it is
already there (same on-disk format and pipeline as real data).
The data order is a function of the step, so a resumed run sees the same
batches as an uninterrupted one.
"""

import dataclasses
import gc
import json
import os
import signal

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from coarsemetro_jax import body_model as body_model_lib
from coarsemetro_jax import build as build_lib
from coarsemetro_jax import checkpoints
from coarsemetro_jax import hand_model as hand_model_lib
from coarsemetro_jax import hand_steps
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import metrics as metrics_lib
from coarsemetro_jax import optimizer
from coarsemetro_jax import steps
from data_pipelines import bad_rows
from data_pipelines import datasets
from data_pipelines import metro_labels


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


# What a user fixes in the config (CONFIG_ERRORS) or in the files it names
# (INPUT_ERRORS); their messages say what and where, so a command line prints
# them as one line.
CONFIG_ERRORS = (datasets.DataConfigError,)
INPUT_ERRORS = (
    datasets.InputError,
    bad_rows.TooManyBadRowsError,
    metro_labels.BadRowError,
    checkpoints.CheckpointError,
    body_model_lib.BodyModelError,
    mesh_topology.TopologyError,
    NonFiniteLossError,
)


class _SigtermFlag:
  """Turns SIGTERM (e.g. a cluster preemption notice) into a save-and-exit.

  One process only: with several, a signal reaching some of them would stop
  them alone (the others would wait in a collective forever). There JAX's
  preemption service (started by jax.distributed.initialize) takes the signal
  and `CheckpointManager.reached_preemption` stops all processes at the same
  step.
  """

  def __init__(self):
    self.raised = False
    self._previous = None
    if jax.process_count() > 1:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing and stopping.')
    self.raised = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_file(key, path, error, what):
  """One line for the log; `error` unless `path` is a readable file."""
  if not os.path.isfile(path) or not os.access(path, os.R_OK):
    raise error(f'config.{key}: {what} not found or not readable: {path}')
  return f'config.{key}: {path}'


def check_model_inputs(config):
  """Checks the files of the body model, the topology and init_from exist.

  Their contents are checked where they are read; this only makes a missing
  file fail before any work. Returns one line per input for the log.
  """
  lines = []
  files = (
      ('body_model.path', body_model_lib.BodyModelError, 'body model'),
      ('body_model.h36m_regressor', body_model_lib.BodyModelError, 'H36M regressor'),
      ('topology.hierarchy', mesh_topology.TopologyError, 'mesh hierarchy'),
  )
  if build_lib.is_hand(config):  # the hand model replaces the body model's files
    files = (('hand_model.path', hand_model_lib.HandModelError, 'hand model'),) + files[2:]
  for key, error, what in files:
    section, name = key.split('.')
    path = config[section][name]
    lines.append(_check_file(key, path, error, what) if path else f'config.{key}: embedded')
  prefix = config.topology.adjmat_prefix
  if prefix:
    lines += [
        _check_file(
            'topology.adjmat_prefix',
            f'{prefix}_{k}.pt',
            mesh_topology.TopologyError,
            'decoder adjacency file',
        )
        for k in ('indices', 'values', 'size')
    ]
  if config.init_from:
    if not os.path.exists(config.init_from) or not os.access(config.init_from, os.R_OK):
      raise checkpoints.CheckpointError(
          f'config.init_from: not found or not readable: {config.init_from}'
      )
    lines.append(f'config.init_from: {config.init_from}')
  else:
    lines.append('config.init_from: unset (a new run starts from random weights)')
  return lines


def check_inputs(config):
  """Checks every input of a run before any work; logs one line per input.

  Raises:
    datasets.DataConfigError: config.data names no complete data source.
    datasets.InputError, body_model.BodyModelError, mesh_topology.TopologyError,
    checkpoints.CheckpointError: an input file is missing or unreadable.
  """
  for line in datasets.check_inputs(config.data) + check_model_inputs(config):
    logging.info('input %s', line)


def abstract_train_state(config, model, device_mesh, image_shape, steps_per_epoch):
  """Shapes, dtypes and shardings of the TrainState, without initialising it."""
  abstract = jax.eval_shape(
      lambda key: steps.create_train_state(
          config, model, key, device_mesh, image_shape, steps_per_epoch=steps_per_epoch
      )[0],
      jax.random.key(config.seed),
  )
  sharding = steps.state_sharding(
      abstract, device_mesh, config.param_sharding, config.fsdp_min_size
  )
  return (
      jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sharding
      ),
      sharding,
  )


def initial_state(config, model, steps_per_epoch, device_mesh, manager, mode='train'):
  """(state, state_sharding, origin) from the workdir, `init_from`, or scratch.

  origin is 'resumed', 'init_from' or 'scratch'. A resume restores the whole
  TrainState (step, params, batch_stats, AdamW moments) into its shardings
  without running the initialiser, from the newest step that reads back and
  matches its checksums (a corrupt newer one gets a warning and, in mode
  'train', is moved aside; none intact is a CheckpointError); `init_from` (a
  converted PyTorch checkpoint, a training workdir or step directory)
  replaces params and batch_stats of a fresh state and starts at step 0.
  """
  image_shape = (config.data.image_size, config.data.image_size, 3)
  if manager.latest_step() is not None:
    logging.info('Resuming from %s step %d', manager.directory, manager.latest_step())
    abstract, state_sharding = abstract_train_state(
        config, model, device_mesh, image_shape, steps_per_epoch
    )
    state, _ = checkpoints.restore_newest_intact(
        manager, abstract, set_aside_corrupt=mode == 'train'
    )
    return state, state_sharding, 'resumed'
  state, state_sharding = steps.create_train_state(
      config,
      model,
      jax.random.key(config.seed),
      device_mesh,
      image_shape,
      steps_per_epoch=steps_per_epoch,
  )
  if config.init_from:
    logging.info('Initialising from %s', config.init_from)
    variables = checkpoints.load_variables(
        config.init_from, {'params': state.params, 'batch_stats': state.batch_stats}
    )
    state = state.replace(
        params=variables['params'], batch_stats=variables.get('batch_stats', state.batch_stats)
    )
    state = jax.device_put(state, state_sharding)
    return state, state_sharding, 'init_from'
  return state, state_sharding, 'scratch'


def _check_finite(metrics, step):
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f'non-finite training values at step {step}: {bad}. Stopping; the last '
        'good checkpoint is kept. Check the input batch for NaN/Inf labels or '
        'images and lower config.optim.lr.'
    )


def _local_rows(x):
  """This process's rows of a batch-sharded global array, in order (numpy)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  rows = {}
  for shard in x.addressable_shards:  # replicas of a row block appear once
    rows.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])


def evaluate(eval_step, state, data, batch_sharding, max_batches=None):
  """Runs the eval set.

  Returns:
    (metrics in mm with '<name>_count' = examples counted, the first batch and
    its predictions as this process's rows in numpy, for pictures).
  """
  collection, first = None, None
  for i, batch in enumerate(data.eval_batches(batch_sharding)):
    if max_batches is not None and i >= max_batches:
      break
    update, predictions = eval_step(state, batch)
    collection = update if collection is None else collection.merge(update)
    if first is None:
      first = jax.tree.map(_local_rows, {'batch': batch, 'predictions': predictions})
  result = {k: float(v) for k, v in collection.compute().items()}
  hand = isinstance(collection, metrics_lib.HandEvalMetrics)
  counted = metrics_lib.HAND_COUNTED if hand else ('mpjpe', 'mpve')
  result.update({f'{k}_count': int(getattr(collection, k).count) for k in counted})
  return result, first


def metrics_table(results, baseline=None):
  """Markdown table of eval metrics (mm), with the mean-pose baseline if given."""
  lines = ['| model | MPJPE (mm) | PA-MPJPE (mm) | MPVE (mm) | examples |', '|---|---|---|---|---|']
  for name, r in results:
    lines.append(
        f"| {name} | {r['mpjpe']:.1f} | {r['pa_mpjpe']:.1f} | "
        f"{r['mpve']:.1f} | {r['mpjpe_count']} |"
    )
  if baseline is not None:
    lines.append(
        f"| mean-pose baseline | {baseline['mpjpe']:.1f} | "
        f"{baseline['pa_mpjpe']:.1f} | - | {baseline['count']} |"
    )
  return '\n'.join(lines)


def skipped_rows_line(skipped):
  """'Skipped rows: ...' of {'train' | 'eval': {file: rows}} (this host's reads)."""
  parts = [
      f'{n} in {path} ({split})' for split, files in skipped.items() for path, n in files.items()
  ]
  return 'Skipped rows: ' + (', '.join(parts) if parts else 'none')


def _write_pictures(writer, step, first, topology, workdir, num_images):
  """Image summary and PNG of predicted meshes over eval images."""
  from coarsemetro_jax import visualize

  batch, pred = first['batch'], first['predictions']
  keep = np.flatnonzero(batch['mask'] > 0)[:num_images]
  grid = visualize.prediction_grid(
      visualize.denormalize(batch['image'][keep]),
      pred['pred_vertices'][keep],
      pred['pred_cam'][keep],
      topology.faces[0],
  )
  writer.write_images(step, {'eval/predictions': grid[None]})
  path = os.path.join(workdir, f'predictions_step{step}.png')
  visualize.save_png(path, grid)
  return path


def train_and_evaluate(config, workdir, mode='train'):
  """Trains (mode 'train') or evaluates a checkpoint (mode 'eval').

  Args:
    config: ml_collections config (configs/r50.py).
    workdir: checkpoints/, TensorBoard events, eval_results.{json,md} and the
      predictions PNG go here; an existing checkpoint here is resumed.
    mode: 'train' or 'eval' (the workdir's latest checkpoint, else
      config.init_from).
  Returns:
    The summary written to eval_results.json ('step', 'eval' metrics in mm
    with '<metric>_count' examples, 'eval_no_flip' the same without the flip
    test when config.eval_flip is on, 'mean_pose_baseline' (synthetic data),
    'train' last-step losses, 'skipped_rows' {'train' | 'eval': {file: rows}},
    'picture'), or None when stopped by SIGTERM/preemption (after
    checkpointing).
  Raises:
    NonFiniteLossError: a NaN/Inf loss or gradient norm (the last good
      checkpoint is kept).
    checkpoints.CheckpointError: mode 'eval' without a checkpoint, or an
      init_from checkpoint of another model.
    CONFIG_ERRORS, INPUT_ERRORS: a setting or an input to fix (`check_inputs`,
      or too many bad rows).
  """
  if mode not in ('train', 'eval'):
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
  workdir = os.path.abspath(workdir)
  check_inputs(config)
  rendered = None
  if config.data.source == 'synthetic':
    rendered = datasets.prepare_synthetic(config.data)
  os.makedirs(workdir, exist_ok=True)
  topology, body, model = build_lib.build(config)
  data = datasets.Datasets.create(config, rendered)
  device_mesh = steps.make_device_mesh()
  batch_sharding = steps.batch_sharding(device_mesh)
  num_steps = optimizer.total_train_steps(config, data.steps_per_epoch)
  manager = checkpoints.make_manager(
      workdir, config.checkpoint_every_steps, config.keep_checkpoints
  )
  run = _Run(
      config, workdir, topology, body, model, data, device_mesh, batch_sharding, num_steps, manager
  )
  try:
    return _train_or_eval(run, mode)
  finally:
    # Also on errors (NaN guard, crash): let a pending async save of the last
    # good step finish, so a restart finds it.
    manager.wait_until_finished()
    manager.close()


@dataclasses.dataclass(frozen=True)
class _Run:
  """What `train_and_evaluate` sets up once for the loop and the evaluations."""

  config: ml_collections.ConfigDict
  workdir: str
  topology: mesh_topology.MeshTopology
  body: body_model_lib.BodyModel | hand_model_lib.HandModel  # the hand's for hand configs
  model: nn.Module
  data: datasets.Datasets
  device_mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  num_steps: int
  manager: ocp.CheckpointManager


def _train_or_eval(run, mode):
  """train_and_evaluate after the setup; see there."""
  config, data, manager = run.config, run.data, run.manager
  model, body, topology, batch_sharding = run.model, run.body, run.topology, run.batch_sharding
  num_steps = run.num_steps
  steps_per_epoch = data.steps_per_epoch
  if mode == 'eval' and manager.latest_step() is None and not config.init_from:
    raise checkpoints.CheckpointError(
        f'--mode=eval needs a checkpoint in {manager.directory} or config.init_from'
    )
  state, state_sharding, origin = initial_state(
      config, model, steps_per_epoch, run.device_mesh, manager, mode
  )
  start_step = int(jax.device_get(state.step))
  step_lib = hand_steps if build_lib.is_hand(config) else steps
  eval_step = step_lib.make_eval_step(config, model, body, topology, state_sharding, batch_sharding)
  # With the flip test on, the final table also has the single-view protocol.
  no_flip_step = (
      step_lib.make_eval_step(
          config, model, body, topology, state_sharding, batch_sharding, flip=False
      )
      if config.eval_flip
      else None
  )
  writer = metric_writers.create_default_writer(run.workdir, just_logging=jax.process_index() > 0)
  if mode == 'eval':
    return _final_eval(run, writer, state, start_step, eval_step, no_flip_step)

  logging.info(
      'Training %s from step %d (%s) to %d; %d steps per epoch',
      config.model.name,
      start_step,
      origin,
      num_steps,
      steps_per_epoch,
  )
  writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})
  train_step = step_lib.make_train_step(
      config, model, body, topology, state_sharding, batch_sharding
  )
  rng = jax.random.key(config.seed + 1)
  report = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps
  )
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  sigterm = _SigtermFlag()
  meta = lambda step: {
      'step': step,
      'epoch': step / steps_per_epoch,
      'model': config.model.to_dict(),
  }
  pending, last_train = None, None
  batches = data.train_batches(batch_sharding, start_step)
  # Python's cyclic GC would otherwise walk the whole object graph of JAX,
  # TensorFlow and Flax in each of its full collections, on the thread that
  # dispatches the steps; freezing what exists now takes it out of those walks.
  # Objects made in the loop are still collected.
  gc.collect()
  gc.freeze()
  try:
    with metric_writers.ensure_flushes(writer):
      for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = next(batches)
          state, metrics = train_step(state, batch, rng)
        # Check and log the previous step's metrics after dispatching this
        # one, so the host never waits on the device (nanodo).
        if pending is not None:
          _log_train(writer, *pending, config)
        pending = (step, metrics)
        report(step)
        is_last = step == num_steps
        stop = sigterm.raised or manager.reached_preemption(step)
        if step % config.checkpoint_every_steps == 0 or is_last or stop:
          # Never checkpoint a non-finite state: check this step first.
          _check_finite(jax.device_get(metrics), step)
          manager.save(step, args=checkpoints.save_args(state, meta(step)), force=is_last or stop)
        if stop:
          logging.warning('Stopping at step %d for preemption.', step)
          break
        if step % eval_every == 0 and not is_last:
          with report.timed('eval'):
            result, _ = evaluate(
                eval_step, state, data, batch_sharding, config.eval_max_batches or None
            )
          writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
      if pending is not None:
        last_train = _log_train(writer, *pending, config, force=True)
  finally:
    gc.unfreeze()
    sigterm.restore()
    batches.close()  # stops the input pipeline's prefetch thread
  if sigterm.raised:
    return None
  manager.wait_until_finished()
  step = int(jax.device_get(state.step))
  return _final_eval(run, writer, state, step, eval_step, no_flip_step, last_train)


def _log_train(writer, step, metrics, config, force=False):
  """NaN/Inf guard on every step; writes train scalars every `log_every_steps`."""
  values = jax.device_get(metrics)
  _check_finite(values, step)
  if step % config.log_every_steps == 0 or force:
    writer.write_scalars(step, {f'train/{k}': float(v) for k, v in values.items()})
  return {k: float(v) for k, v in values.items()}


def _final_eval(run, writer, state, step, eval_step, no_flip_step=None, train_metrics=None):
  """Full evaluation, metrics table (+ mean-pose baseline) and the picture.

  With `no_flip_step` (config.eval_flip on) the table has a row for each
  protocol: single view, then with the flip test; 'eval' in the summary is
  the configured one (flip test) and 'eval_no_flip' the single view. The
  mean-pose baseline is scored on synthetic data only (it reads every label of
  the training set). The run ends with the rows it skipped in each file.
  """
  config, data, batch_sharding = run.config, run.data, run.batch_sharding
  result, first = evaluate(eval_step, state, data, batch_sharding)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in result.items()})
  hand = build_lib.is_hand(config)
  baseline = None
  if data.synthetic and hand:
    baseline = datasets.hand_baseline(
        data.data_config.train_yaml, data.data_config.eval_yaml, config.hand_model.path
    )
  elif data.synthetic:
    baseline = metrics_lib.mean_pose_baseline(
        datasets.j14_joints(data.data_config.train_yaml),
        datasets.j14_joints(data.data_config.eval_yaml),
    )
  name = f'{config.model.name} step {step}'
  summary = {'step': step, 'eval': result, 'mean_pose_baseline': baseline}
  rows = [(name, result)]
  if no_flip_step is not None:
    single, _ = evaluate(no_flip_step, state, data, batch_sharding)
    writer.write_scalars(step, {f'eval_no_flip/{k}': v for k, v in single.items()})
    summary['eval_no_flip'] = single
    rows = [(name, single), (f'{name} + flip test', result)]
  table = (metrics_lib.hand_metrics_table if hand else metrics_table)(rows, baseline)
  if train_metrics is not None:
    summary['train'] = train_metrics  # the last step's loss terms
  summary['skipped_rows'] = data.skipped_rows()
  skipped = skipped_rows_line(summary['skipped_rows'])
  logging.info('%s', skipped)
  if jax.process_index() == 0:
    try:
      if config.num_eval_images > 0:  # 0: no picture
        summary['picture'] = _write_pictures(
            writer, step, first, run.topology, run.workdir, config.num_eval_images
        )
    except ImportError as e:  # visualize needs the optional rasterizer deps
      logging.warning('No prediction picture: %s', e)
    with open(os.path.join(run.workdir, 'eval_results.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(run.workdir, 'eval_results.md'), 'w') as f:
      f.write(table + '\n')
    print(table, flush=True)
    print(skipped, flush=True)
    if 'picture' in summary:
      print(f"Predicted meshes over test images: {summary['picture']}", flush=True)
  return summary
