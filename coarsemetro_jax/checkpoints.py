"""Checkpoint layout: orbax training checkpoints and loading weights for inference.

A training workdir holds `checkpoints/<step>/` written by an orbax
`CheckpointManager` with two items:
  state   the TrainState (step, params, batch_stats, opt_state), StandardSave
  meta    JSON: step, epoch, the model config and its label
`python -m coarsemetro_jax.convert` writes a single orbax directory of
{'params', 'batch_stats'} (coarsemetro_jax/convert/orbax_variables.py).
`load_variables` accepts any of: a workdir (latest step), a step directory,
its `state` item, or a converted directory.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from coarsemetro_jax.convert import orbax_variables

CHECKPOINT_DIR = 'checkpoints'
STATE_ITEM, META_ITEM = 'state', 'meta'


class CheckpointError(ValueError):
  """A checkpoint path is missing or does not hold what was expected."""


def _state_handler():
  """PyTree handler with orbax's standard types; each jax.Array written by one replica.

  Orbax's CPU/TPU default ('replica-parallel') splits every replicated array
  into one slice per device and dispatches a small jitted slice per shape;
  for this model's state (< 1 GB even at R50 with AdamW moments) that costs
  more than it saves (a quarter of a short 8-device CPU run). It is orbax's
  GPU default anyway. The files are the same as StandardSave's.
  """
  standard = [(t, ocp.type_handlers.get_type_handler(t))
              for t in (int, float, bytes, np.number, np.ndarray, str)]
  registry = ocp.type_handlers.create_type_handler_registry(
      *standard, (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(workdir, save_every_steps, keep, *, create=True):
  """CheckpointManager for `workdir/checkpoints` (async saves, keep the last `keep`)."""
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      create=create)
  handlers = ocp.DefaultCheckpointHandlerRegistry()
  state_handler, meta_handler = _state_handler(), ocp.JsonCheckpointHandler()
  handlers.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
  handlers.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
  handlers.add(META_ITEM, ocp.args.JsonSave, meta_handler)
  handlers.add(META_ITEM, ocp.args.JsonRestore, meta_handler)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=options, handler_registry=handlers)


def save_args(state, meta):
  return ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave(state),
                               META_ITEM: ocp.args.JsonSave(meta)})


def restore_args(abstract_state):
  """Restores into `abstract_state` (jax.ShapeDtypeStructs with shardings)."""
  return ocp.args.Composite(**{
      STATE_ITEM: ocp.args.PyTreeRestore(
          abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
      META_ITEM: ocp.args.JsonRestore()})


def resolve(path):
  """The orbax directory holding {'params', 'batch_stats', ...} for `path`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint not found: {path}')
  ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir):          # a workdir: take the latest step
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    if not steps:
      raise CheckpointError(f'{path}: workdir has no saved steps in {ckpt_dir}')
    path = os.path.join(ckpt_dir, str(steps[-1]))
  if os.path.isdir(os.path.join(path, STATE_ITEM)):   # a step directory
    path = os.path.join(path, STATE_ITEM)
  return path


def load_variables(path, variables):
  """Loads {'params', 'batch_stats'} for a model from any checkpoint kind.

  Args:
    path: workdir, step directory, its `state` item, or a converted checkpoint.
    variables: the model's variables or their `jax.eval_shape`; defines the
      expected tree, shapes and dtypes (and shardings of the result).
  Raises:
    CheckpointError: the path has no checkpoint, or it belongs to another
      model (the message lists missing, unexpected and mis-shaped leaves).
  """
  directory = resolve(path)
  expected = {c: variables[c] for c in ('params', 'batch_stats') if variables.get(c)}
  try:
    return orbax_variables.restore_into(directory, expected)
  except (ValueError, FileNotFoundError) as e:
    raise CheckpointError(f'cannot load {path}: {e}') from e
