"""Checkpoint layout: orbax training checkpoints and loading weights for inference.

A training workdir holds `checkpoints/<step>/` written by an orbax
`CheckpointManager` with two items:
  state   the TrainState (step, params, batch_stats, opt_state), StandardSave
  meta    JSON: step, epoch, the model config and its label, and `checksums`:
          {array path: uint32} of every TrainState array (coarsemetro_jax/checksums.py)
`python -m coarsemetro_jax.convert` writes a single orbax directory of
{'params', 'batch_stats'} (coarsemetro_jax/convert/orbax_variables.py), with
its own checksums.

Every restore is verified against the checksums; a step that cannot be read
or does not match them is corrupt. Resuming (`restore_newest_intact`) then
takes the next older step, and moves the corrupt one aside to
`checkpoints/<step>.corrupt` (never deleting it; orbax ignores the name).
`load_variables` accepts any of: a workdir (its newest intact step), a step
directory, its `state` item, or a converted directory.
"""

import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from coarsemetro_jax import checksums as checksums_lib
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib

CHECKPOINT_DIR = 'checkpoints'
STATE_ITEM, META_ITEM = 'state', 'meta'
META_FILE = 'metadata'  # the JSON file inside the meta item
CORRUPT_SUFFIX = '.corrupt'  # not a step name to orbax: never listed, never deleted


class CheckpointError(ValueError):
  """A checkpoint path is missing or does not hold what was expected."""


class CorruptCheckpointError(CheckpointError, orbax_variables.UnreadableCheckpointError):
  """A checkpoint cannot be read back, or its arrays do not match their checksums."""


def _state_handler():
  """PyTree handler with orbax's standard types; each jax.Array written by one replica.

  Orbax's CPU/TPU default ('replica-parallel') splits every replicated array
  into one slice per device and dispatches a small jitted slice per shape;
  for this model's state (< 1 GB even at R50 with AdamW moments) that costs
  more than it saves (a quarter of a short 8-device CPU run). It is orbax's
  GPU default anyway. The files are the same as StandardSave's.
  """
  standard = [
      (t, ocp.type_handlers.get_type_handler(t))
      for t in (int, float, bytes, np.number, np.ndarray, str)
  ]
  registry = ocp.type_handlers.create_type_handler_registry(
      *standard, (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False))
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(workdir, save_every_steps, keep, *, create=True):
  """CheckpointManager for `workdir/checkpoints` (async saves, keep the last `keep`)."""
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      create=create,
  )
  handlers = ocp.DefaultCheckpointHandlerRegistry()
  state_handler, meta_handler = _state_handler(), ocp.JsonCheckpointHandler()
  handlers.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
  handlers.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
  handlers.add(META_ITEM, ocp.args.JsonSave, meta_handler)
  handlers.add(META_ITEM, ocp.args.JsonRestore, meta_handler)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      options=options,
      handler_registry=handlers,
  )


def save_args(state, meta):
  """Save args of `state` and `meta` plus the checksums of the state's arrays.

  The checksums are computed on device from the same arrays the (async) save
  writes; only one uint32 per array comes to the host.
  """
  meta = {**meta, 'checksums': checksums_lib.tree_checksums(state)}
  return ocp.args.Composite(
      **{STATE_ITEM: ocp.args.PyTreeSave(state), META_ITEM: ocp.args.JsonSave(meta)}
  )


def restore_args(abstract_state):
  """Restores into `abstract_state` (jax.ShapeDtypeStructs with shardings)."""
  return ocp.args.Composite(
      **{
          STATE_ITEM: ocp.args.PyTreeRestore(
              abstract_state,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
          ),
          META_ITEM: ocp.args.JsonRestore(),
      }
  )


# ----------------------------------------------------------------------------
# Resuming a training run.


def restore_state(manager, step, abstract_state):
  """The TrainState of `step`, verified against its checksums.

  Raises:
    CheckpointError: the step holds another model's or optimiser's state.
    CorruptCheckpointError: it cannot be read, or does not match its checksums.
  """
  step_dir = os.path.join(manager.directory, str(step))
  _check_fits(step_dir, abstract_state)
  orbax_variables.quiet_abandoned_reads()
  try:
    restored = manager.restore(step, args=restore_args(abstract_state))
  except Exception as e:
    if orbax_variables.is_resource_error(e):
      raise
    raise CorruptCheckpointError(f'{step_dir} cannot be read: {orbax_variables.reason(e)}') from e
  state, meta = restored[STATE_ITEM], restored[META_ITEM]
  expected = meta.get('checksums') if isinstance(meta, dict) else None
  if expected is None:
    logging.warning(
        '%s has no checksums (saved before they were added): resuming ' 'without verifying it',
        step_dir,
    )
    return state
  try:
    checksums_lib.verify(state, expected, step_dir)
  except checksums_lib.ChecksumError as e:
    raise CorruptCheckpointError(str(e)) from e
  return state


def _check_fits(step_dir, abstract_state):
  """CheckpointError unless the step's arrays have the paths, shapes and dtypes of the state."""
  from etils import epath

  item = os.path.join(step_dir, STATE_ITEM)
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(item)).tree
  except Exception as e:
    raise CorruptCheckpointError(
        f'{step_dir}: its array metadata cannot be read: {orbax_variables.reason(e)}'
    ) from e
  want = _shapes(abstract_state)
  got = _shapes(saved)
  problems = []
  if missing := [p for p in want if p not in got]:
    problems.append(state_dict_lib.listing('missing in the checkpoint', missing))
  if unexpected := [p for p in got if p not in want]:
    problems.append(state_dict_lib.listing('not in this config', unexpected))
  if bad := [
      f'{p}: checkpoint {got[p]}, config {want[p]}' for p in want if p in got and got[p] != want[p]
  ]:
    problems.append(state_dict_lib.listing('mis-shaped or mis-typed', bad))
  if problems:
    step = os.path.basename(step_dir)
    raise CheckpointError(
        f'{os.path.dirname(step_dir)} step {step} does not fit this config (another model '
        f'or optimiser?); use a new --workdir, or config.init_from to start from its '
        f'weights:\n' + '\n'.join(problems)
    )


def _shapes(tree):
  return {
      checksums_lib.path_name(p): f'{list(x.shape)} {np.dtype(x.dtype)}'
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def set_aside(manager, step):
  """Renames a corrupt step to `<step>.corrupt` (or .corrupt-2, ...); returns the new path.

  Out of the manager's way (a later save of the same step number works, the
  LatestN policy never deletes it), but kept for inspection.
  """
  step_dir = os.path.join(manager.directory, str(step))
  target, n = step_dir + CORRUPT_SUFFIX, 1
  while os.path.exists(target):
    n += 1
    target = f'{step_dir}{CORRUPT_SUFFIX}-{n}'
  if jax.process_count() > 1:  # every process has chosen the name before the rename
    multihost_utils.sync_global_devices(f'set_aside_{step}_chosen')
  if jax.process_index() == 0:
    os.rename(step_dir, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'set_aside_{step}_done')
  manager.reload()
  return target


def restore_newest_intact(manager, abstract_state, set_aside_corrupt=True):
  """(state, step) of the newest intact step in `manager`, or None when it has none.

  Each newer, corrupt step gets one warning naming it and the reason; with
  `set_aside_corrupt` (training: the run will save that step number again) it
  is moved aside (`set_aside`), else left in place. When no step is intact,
  all stay where they are (a rerun fails the same way instead of starting
  afresh).

  Raises:
    CheckpointError: a step of another config (no fallback: a user error), or
      every step is corrupt (listing them).
  """
  corrupt = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore_state(manager, step, abstract_state)
    except CorruptCheckpointError as e:
      corrupt.append((step, e))
      continue
    for bad, error in corrupt:
      where = f'moved to {set_aside(manager, bad)}' if set_aside_corrupt else 'left in place'
      logging.warning('Corrupt checkpoint (%s); using step %d instead. %s', where, step, error)
    return state, step
  if corrupt:
    raise CheckpointError(
        f'{manager.directory}: no intact checkpoint (nothing was moved '
        'or deleted):\n' + '\n'.join(f'  {e}' for _, e in corrupt)
    )
  return None


# ----------------------------------------------------------------------------
# Loading weights (infer, convert, --mode=eval, init_from).


def _step_dirs(ckpt_dir):
  """Step directories of a CheckpointManager directory, newest first."""
  steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  return [os.path.join(ckpt_dir, str(s)) for s in steps]


def resolve(path):
  """The orbax directory holding {'params', 'batch_stats', ...} for `path`.

  For a workdir, its newest step (intact or not; `read_variables` falls back).
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint not found: {path}')
  ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir):  # a workdir: take the latest step
    steps = _step_dirs(ckpt_dir)
    if not steps:
      raise CheckpointError(f'{path}: workdir has no saved steps in {ckpt_dir}')
    path = steps[0]
  if os.path.isdir(os.path.join(path, STATE_ITEM)):  # a step directory
    path = os.path.join(path, STATE_ITEM)
  return path


def read_variables(path):
  """(variables as numpy, conversion metadata or {}) of any checkpoint kind, verified.

  A workdir gives its newest intact step: a corrupt newer one gets a warning
  (and is left where it is: reading changes nothing).

  Raises:
    CheckpointError: not found, not a checkpoint, or no `params`.
    CorruptCheckpointError: unreadable or not matching its checksums (for a
      workdir: every step).
  """
  path = os.path.abspath(path)
  ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    return _read_one(resolve(path))
  resolve(path)  # the errors for a workdir without steps
  problems = []
  for step_dir in _step_dirs(ckpt_dir):
    try:
      return _read_one(os.path.join(step_dir, STATE_ITEM))
    except CorruptCheckpointError as e:
      logging.warning('%s; using the previous step', e)
      problems.append(f'  {e}')
  raise CorruptCheckpointError(
      f'{path}: no intact checkpoint in {ckpt_dir}:\n' + '\n'.join(problems)
  )


def _read_one(directory):
  """read_converted with a training step's checksums from its meta item."""
  expected = None
  meta_file = os.path.join(os.path.dirname(directory), META_ITEM, META_FILE)
  if os.path.basename(directory) == STATE_ITEM and os.path.exists(meta_file):
    try:
      with open(meta_file) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(f'{meta_file} cannot be read: {e}') from e
    # A training step saved before checksums existed: read_converted warns.
    expected = meta.get('checksums') if isinstance(meta, dict) else None
  try:
    return orbax_variables.read_converted(directory, expected)
  except orbax_variables.UnreadableCheckpointError as e:
    raise CorruptCheckpointError(str(e)) from e
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(f'cannot load {directory}: {e}') from e


def load_variables(path, variables):
  """Loads {'params', 'batch_stats'} for a model from any checkpoint kind.

  Args:
    path: workdir, step directory, its `state` item, or a converted checkpoint.
    variables: the model's variables or their `jax.eval_shape`; defines the
      expected tree, shapes and dtypes (and shardings of the result).
  Raises:
    CheckpointError: the path has no checkpoint, or it belongs to another
      model (the message lists missing, unexpected and mis-shaped leaves).
    CorruptCheckpointError: see `read_variables`.
  """
  loaded, metadata = read_variables(path)
  expected = {c: variables[c] for c in ('params', 'batch_stats') if variables.get(c)}
  try:
    return orbax_variables.fit_variables(loaded, metadata, expected, path)
  except ValueError as e:
    raise CheckpointError(f'cannot load {path}: {e}') from e
