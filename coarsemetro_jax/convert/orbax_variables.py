"""Reading PyTorch state dicts; writing/reading converted orbax checkpoints.

A converted checkpoint is an orbax `StandardCheckpointer` directory holding
{'params', 'batch_stats'} as numpy arrays, with custom metadata under
`METADATA_KEY`:

  kind    e.g. 'fastmetro-S-r50', 'resnet50-imagenet'
  scope   'model'    - the whole model's variables;
          'backbone' - only the backbone subtree ({'params': {'backbone': ...},
                       'batch_stats': {'backbone': ...}}), e.g. ImageNet
                       weights: `restore_into` merges it into a fresh model
  model   config.model used for the conversion (for --to-torch)
  source  the converted file
  checksums  {array path: uint32} (coarsemetro_jax/checksums.py), verified on
          every read
  carried_keys  the source keys kept unchanged under the tree's `carried`
          entry (no Flax counterpart: HRNet's classifier, BatchNorm counters;
          `state_dict.Report.carried`), in source order, for --to-torch

`read_converted` also reads a training checkpoint's `state` item (its checksums
come from the step's meta item: `coarsemetro_jax.checkpoints` passes them).
`restore_into(directory, variables)` fits a converted checkpoint into a model's variables.
"""

import collections
import logging as pylogging
import os
import sys

from absl import logging
import jax
import numpy as np

from coarsemetro_jax import checksums as checksums_lib
from coarsemetro_jax.convert import smpl_param_table
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import torch_file
from coarsemetro_jax.models import fastmetro

METADATA_KEY = 'coarsemetro_convert'
CARRIED = 'carried'  # tree entry of the carried source tensors, nested at the key's dots
_HEAD = smpl_param_table.FLAX_PREFIX.rstrip('/')
# Containers other training scripts wrap a state dict in.
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module')
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'  # orbax's per-checkpoint metadata
MAX_REASON_CHARS = 300
ORBAX_CODE = f'{os.sep}orbax{os.sep}checkpoint{os.sep}'  # in paths of orbax's source files


class UnreadableCheckpointError(ValueError):
  """A checkpoint's files cannot be read back, or do not match their checksums."""


def read_state_dict(path, progress=None):
  """A PyTorch file -> (OrderedDict key -> np.ndarray, list of notes).

  Unwraps {'state_dict': ...}-style containers and a DistributedDataParallel
  'module.' prefix; refuses anything that is not a flat dict of tensors.
  """
  obj = torch_file.load(path, progress=progress)
  notes = []
  if isinstance(obj, dict) and not _is_state_dict(obj):
    inner = [k for k in WRAPPER_KEYS if k in obj and _is_state_dict(obj[k])]
    if len(inner) == 1:
      notes.append(
          f'using the {inner[0]!r} entry of the file '
          f'(other entries: {sorted(k for k in obj if k != inner[0])})'
      )
      obj = obj[inner[0]]
  if not isinstance(obj, dict) or not _is_state_dict(obj):
    kinds = (
        sorted({type(v).__name__ for v in obj.values()})
        if isinstance(obj, dict)
        else type(obj).__name__
    )
    raise torch_file.TorchFileError(
        f'{path}: expected a state dict (name -> tensor), found {kinds}'
    )
  if obj and all(k.startswith('module.') for k in obj):
    notes.append("stripped the DistributedDataParallel 'module.' prefix")
    obj = collections.OrderedDict((k[len('module.') :], v) for k, v in obj.items())
  return collections.OrderedDict(obj), notes


def _is_state_dict(obj):
  return (
      isinstance(obj, dict)
      and bool(obj)
      and all(isinstance(k, str) for k in obj)
      and all(isinstance(v, np.ndarray) for v in obj.values())
  )


def save_converted(directory, variables, metadata, carried=None):
  """Writes variables (numpy), carried source tensors, `metadata` and checksums to a new directory."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} already exists; choose a new --out directory')
  if carried:
    variables = {**variables, CARRIED: state_dict_lib.unflatten(carried, sep='.')}
    metadata = {**metadata, 'carried_keys': list(carried)}
  metadata = {**metadata, 'checksums': checksums_lib.tree_checksums(variables)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, variables, custom_metadata={METADATA_KEY: metadata})
    ckptr.wait_until_finished()


def item_directory(directory):
  """`directory`, or the single item folder (default/ or state/) of a step directory."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such checkpoint directory')
  if os.path.exists(os.path.join(directory, '_METADATA')):
    return directory
  items = [
      d for d in ('default', 'state') if os.path.exists(os.path.join(directory, d, '_METADATA'))
  ]
  if len(items) != 1:
    raise FileNotFoundError(
        f'{directory}: not an orbax checkpoint (no _METADATA here or '
        'in a default/ or state/ item folder)'
    )
  return os.path.join(directory, items[0])


def read_converted(directory, expected_checksums=None):
  """(variables as numpy, conversion metadata or {}) of an orbax directory, verified.

  A converted directory's carried tensors come back as variables['carried']
  (torch key -> np.ndarray in source order, dtypes exact: int64 counters too).

  Training checkpoints (a TrainState with `params`/`batch_stats` fields) are
  accepted too, given as the step directory of a CheckpointManager (its
  single item folder, e.g. `default/` or `state/`, is found) or the item
  folder itself; only `params` and `batch_stats` are returned.

  Args:
    directory: a converted checkpoint, a training step or its item folder.
    expected_checksums: {path: checksum} of (at least) params and batch_stats;
      default: the `checksums` in a converted checkpoint's metadata. Without
      any, one warning says that the arrays cannot be verified.
  Raises:
    FileNotFoundError: not an orbax checkpoint.
    UnreadableCheckpointError: orbax/TensorStore cannot read it (truncated or
      overwritten files), or arrays differ from their checksums.
    ValueError: it has no `params`.
  """
  directory = item_directory(directory)
  try:
    tree, metadata = _restore_on_one_device(directory)
  except Exception as e:
    if is_resource_error(e):
      raise
    raise UnreadableCheckpointError(f'{directory} cannot be read: {reason(e)}') from e
  if not isinstance(tree, dict) or 'params' not in tree:
    raise ValueError(
        f'{directory}: checkpoint has no top-level "params" entry '
        f'(found {sorted(tree) if isinstance(tree, dict) else type(tree)})'
    )
  variables = {c: tree[c] for c in ('params', 'batch_stats', CARRIED) if tree.get(c)}
  if expected_checksums is None:
    expected_checksums = metadata.get('checksums')
  if expected_checksums is None:
    logging.warning(
        '%s has no checksums (written before they were added): its arrays ' 'cannot be verified',
        directory,
    )
  else:
    try:
      checksums_lib.verify(variables, expected_checksums, directory)
    except checksums_lib.ChecksumError as e:
      raise UnreadableCheckpointError(str(e)) from e
  variables = jax.tree.map(np.asarray, variables)
  if CARRIED in variables:
    flat = state_dict_lib.flatten(variables[CARRIED], sep='.')
    variables[CARRIED] = collections.OrderedDict(
        (k, flat[k]) for k in metadata.get('carried_keys', sorted(flat))
    )
  return variables, metadata


def _restore_on_one_device(directory):
  """(restored tree, conversion metadata or {}) of an item directory."""
  from etils import epath
  import orbax.checkpoint as ocp

  quiet_abandoned_reads()
  with ocp.StandardCheckpointer() as ckptr:
    # Only a checkpoint written by a Checkpointer (a converted one) has its own
    # step metadata; a CheckpointManager's item folder has it one level up,
    # and asking for it here would log "Metadata file does not exist".
    if os.path.exists(os.path.join(directory, STEP_METADATA_FILE)):
      step_metadata = ckptr.metadata(directory)
      metadata = (step_metadata.custom_metadata or {}).get(METADATA_KEY, {})
      tree_metadata = step_metadata.item_metadata.tree
    else:
      metadata = {}
      tree_metadata = ckptr.handler.metadata(epath.Path(directory)).tree
    # Restore onto this process's first device whatever layout wrote it (a
    # pod's or another host count's shardings would not exist here).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree_metadata
    )
    if isinstance(target, dict) and CARRIED in target:  # as numpy: int64 stays int64
      target[CARRIED] = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree_metadata[CARRIED])
    return ckptr.restore(directory, target), metadata


def reason(error):
  """First line of the innermost cause of a restore error (orbax wraps TensorStore's)."""
  while _cause(error) is not None:
    error = _cause(error)
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + ' ...'
  return f'{type(error).__name__}: {text}'


def is_resource_error(error):
  """Out of host or device memory: a restore failed for a reason other than its files."""
  while error is not None:
    if isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in str(error):
      return True
    error = _cause(error)
  return False


def _cause(error):
  return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def quiet_abandoned_reads():
  """Silences what the reads of a failed orbax restore report after it.

  Orbax runs a restore's reads as asyncio tasks on a loop that it closes as
  soon as one read fails. The others are abandoned: each one finishing on
  TensorStore's threads reports an unraisable 'Event loop is closed', and as
  they are garbage collected asyncio logs 'Task exception was never
  retrieved' or 'Task was destroyed but it is pending', and Python reports
  their coroutines' errors. For one truncated file that is hundreds of
  tracebacks around the one message that matters (the caller reports the
  failure). From the first call on, this drops exactly those reports:
  unraisable errors of orbax's coroutines or of calls into a closed loop, and
  asyncio's reports of orbax's tasks. Anything else still reaches the
  previous hook or handler. Idempotent.
  """
  if not getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_abandoned_read(unraisable):
        previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
  asyncio_logger = pylogging.getLogger('asyncio')
  if _keep_asyncio_record not in asyncio_logger.filters:
    asyncio_logger.addFilter(_keep_asyncio_record)


def _is_abandoned_read(unraisable):
  error, code = unraisable.exc_value, getattr(unraisable.object, 'cr_code', None)
  if code is not None and ORBAX_CODE in code.co_filename:
    return True  # an orbax read coroutine closed while still waiting
  return (
      isinstance(error, RuntimeError)
      and str(error) == 'Event loop is closed'
      and 'call_soon_threadsafe' in _frames(unraisable.exc_traceback, 'co_name')
  )


def _keep_asyncio_record(record):
  """False for asyncio's reports of orbax's abandoned read tasks."""
  message = record.getMessage()
  if 'Task was destroyed but it is pending' in message:
    return ORBAX_CODE not in message  # the message shows the task's coroutine
  if 'exception was never retrieved' not in message or not record.exc_info:
    return True
  error = record.exc_info[1]
  while error is not None:
    if any(ORBAX_CODE in f for f in _frames(error.__traceback__, 'co_filename')):
      return False
    error = _cause(error)
  return True


def _frames(tb, attr):
  out = []
  while tb is not None:
    out.append(getattr(tb.tb_frame.f_code, attr))
    tb = tb.tb_next
  return out


def mesh_network(paths):
  """'body' or 'hand' for the '/'-joined variable paths of a whole network, else None.

  Paths are 'params/<module>/...' (`state_dict.flatten` of {'params': ...});
  a backbone alone (no token embeddings) is neither.
  """
  modules = {p.split('/')[1] for p in paths if p.startswith('params/') and p.count('/') > 1}
  if 'joint_token_embed' not in modules:
    return None
  return 'body' if fastmetro.UPSAMPLE_MODULE in modules else 'hand'


def check_same_network(got, want, name, kind):
  """One-line ValueError when a checkpoint's network (hand/body) is not the config's."""
  if got and want and got != want:
    raise ValueError(
        f'{name} ({kind}) holds a {got} network, but the config builds a {want} network '
        f'(config.model.hand={want == "hand"}): use a {want} checkpoint, or a {got} config'
    )


def fit_variables(loaded, metadata, variables, name):
  """Places checkpoint arrays into a model's variables (see `restore_into`).

  Args:
    loaded: {'params', 'batch_stats'} of `read_converted`.
    metadata: its conversion metadata ({} for a training checkpoint).
    variables: the model's {'params', 'batch_stats'} (arrays, possibly
      sharded, or jax.ShapeDtypeStruct); defines the expected shapes and the
      shardings of the result.
    name: the checkpoint's path, for messages.
  Returns:
    New variables: the checkpoint's values; for a backbone-only checkpoint the
    backbone subtree is replaced and everything else kept from `variables`;
    likewise the SMPL-parameter head when the checkpoint has none (warning).
  Raises:
    ValueError: listing missing, unexpected and mis-shaped leaves.
  """
  loaded = {c: v for c, v in loaded.items() if c != CARRIED}  # for --to-torch only
  scope = metadata.get('scope', 'model')
  flat_want = {
      f'{c}/{p}': v for c in variables for p, v in state_dict_lib.flatten(variables[c]).items()
  }
  flat_got = {f'{c}/{p}': v for c in loaded for p, v in state_dict_lib.flatten(loaded[c]).items()}
  if scope == 'backbone':
    want = {p: v for p, v in flat_want.items() if p.split('/')[1] == 'backbone'}
  elif scope == 'model':
    want = flat_want
    check_same_network(
        mesh_network(flat_got), mesh_network(flat_want), name, metadata.get('kind', 'unknown kind')
    )
  else:
    raise ValueError(f'{name}: unknown conversion scope {scope!r}')
  problems = []
  missing = [p for p in want if p not in flat_got]
  # FastMETRO trains its SMPL-parameter head on a trained network (loaded with
  # strict=False): a checkpoint with none of the head's leaves fills the rest,
  # and the head keeps the (concrete) values in `variables`.
  head = [p for p in missing if _HEAD in p.split('/')]
  if (
      head
      and not any(_HEAD in p.split('/') for p in flat_got)
      and not any(isinstance(want[p], jax.ShapeDtypeStruct) for p in head)
  ):
    logging.warning(
        '%s has no SMPL-parameter head: its %d leaves keep their initial values', name, len(head)
    )
    want = {p: v for p, v in want.items() if p not in head}
    missing = [p for p in missing if p not in head]
  unexpected = [p for p in flat_got if p not in want]
  bad = [
      f'{p}: checkpoint {list(np.shape(flat_got[p]))} {np.asarray(flat_got[p]).dtype}, '
      f'model {list(want[p].shape)} {np.dtype(want[p].dtype)}'
      for p in want
      if p in flat_got
      and (
          tuple(np.shape(flat_got[p])) != tuple(want[p].shape)
          or np.asarray(flat_got[p]).dtype != np.dtype(want[p].dtype)
      )
  ]
  if missing:
    problems.append(state_dict_lib.listing('missing in the checkpoint', missing))
  if unexpected:
    problems.append(state_dict_lib.listing('not in the model', unexpected))
  if bad:
    problems.append(state_dict_lib.listing('mis-shaped or mis-typed', bad))
  if problems:
    kind = metadata.get('kind', 'unknown kind')
    raise ValueError(
        f'{name} ({kind}, scope {scope}) does not fit the model:\n' + '\n'.join(problems)
    )

  def place(path, old):
    if path not in want:
      return old
    sharding = getattr(old, 'sharding', None)
    return (
        jax.device_put(flat_got[path], sharding)
        if sharding is not None
        else jax.numpy.asarray(flat_got[path])
    )

  out = {}
  for c in variables:
    flat = {p: place(f'{c}/{p}', v) for p, v in state_dict_lib.flatten(variables[c]).items()}
    out[c] = state_dict_lib.unflatten(flat)
  return out


def restore_into(directory, variables):
  """Loads a converted checkpoint into `variables`, verified against its checksums.

  (`coarsemetro_jax.checkpoints.load_variables` takes any checkpoint kind.)

  Args:
    directory: output of `python -m coarsemetro_jax.convert`.
    variables: as in `fit_variables`.
  Returns / Raises: as `read_converted` and `fit_variables`.
  """
  return fit_variables(*read_converted(directory), variables, directory)
