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
  carried_keys  the source keys kept unchanged under the tree's `carried`
          entry (no Flax counterpart: HRNet's classifier, BatchNorm counters;
          `state_dict.Report.carried`), in source order, for --to-torch

`restore_into(directory, variables)` is what `config.init_from` uses.
"""

import collections
import os

from absl import logging
import jax
import numpy as np

from coarsemetro_jax.convert import smpl_param_table
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import torch_file

METADATA_KEY = 'coarsemetro_convert'
CARRIED = 'carried'   # tree entry of the carried source tensors, nested at the key's dots
_HEAD = smpl_param_table.FLAX_PREFIX.rstrip('/')
# Containers other training scripts wrap a state dict in.
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module')


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
      notes.append(f'using the {inner[0]!r} entry of the file '
                   f'(other entries: {sorted(k for k in obj if k != inner[0])})')
      obj = obj[inner[0]]
  if not isinstance(obj, dict) or not _is_state_dict(obj):
    kinds = (sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, dict)
             else type(obj).__name__)
    raise torch_file.TorchFileError(
        f'{path}: expected a state dict (name -> tensor), found {kinds}')
  if obj and all(k.startswith('module.') for k in obj):
    notes.append("stripped the DistributedDataParallel 'module.' prefix")
    obj = collections.OrderedDict((k[len('module.'):], v) for k, v in obj.items())
  return collections.OrderedDict(obj), notes


def _is_state_dict(obj):
  return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
          and all(isinstance(v, np.ndarray) for v in obj.values()))


def save_converted(directory, variables, metadata, carried=None):
  """Writes variables (numpy) with `metadata` (and carried tensors) to a new orbax directory."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} already exists; choose a new --out directory')
  if carried:
    variables = {**variables, CARRIED: state_dict_lib.unflatten(carried, sep='.')}
    metadata = {**metadata, 'carried_keys': list(carried)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, variables, custom_metadata={METADATA_KEY: metadata})
    ckptr.wait_until_finished()


def read_converted(directory):
  """(variables as numpy, conversion metadata or {}) of an orbax directory.

  A converted directory's carried tensors come back as variables['carried']
  (torch key -> np.ndarray in source order, dtypes exact: int64 counters too).

  Training checkpoints (a TrainState with `params`/`batch_stats` fields) are
  accepted too, given as the step directory of a CheckpointManager (its
  single item folder, e.g. `default/` or `state/`, is found) or the item
  folder itself; only `params` and `batch_stats` are returned.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such checkpoint directory')
  if not os.path.exists(os.path.join(directory, '_METADATA')):
    items = [d for d in ('default', 'state')
             if os.path.exists(os.path.join(directory, d, '_METADATA'))]
    if len(items) != 1:
      raise FileNotFoundError(f'{directory}: not an orbax checkpoint (no _METADATA here or '
                              'in a default/ or state/ item folder)')
    directory = os.path.join(directory, items[0])
  with ocp.StandardCheckpointer() as ckptr:
    step_metadata = ckptr.metadata(directory)
    metadata = (step_metadata.custom_metadata or {}).get(METADATA_KEY, {})
    # Restore onto this process's first device whatever layout wrote it (a
    # pod's or another host count's shardings would not exist here).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          step_metadata.item_metadata.tree)
    if isinstance(target, dict) and CARRIED in target:   # as numpy: int64 stays int64
      target[CARRIED] = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                                     step_metadata.item_metadata.tree[CARRIED])
    tree = ckptr.restore(directory, target)
  if not isinstance(tree, dict) or 'params' not in tree:
    raise ValueError(f'{directory}: checkpoint has no top-level "params" entry '
                     f'(found {sorted(tree) if isinstance(tree, dict) else type(tree)})')
  variables = {c: jax.tree.map(np.asarray, tree[c]) for c in ('params', 'batch_stats')
               if c in tree and tree[c]}
  if tree.get(CARRIED):
    flat = state_dict_lib.flatten(tree[CARRIED], sep='.')
    variables[CARRIED] = collections.OrderedDict(
        (k, flat[k]) for k in metadata.get('carried_keys', sorted(flat)))
  return variables, metadata


def restore_into(directory, variables):
  """Loads a converted checkpoint into `variables` (config.init_from).

  Args:
    directory: output of `python -m coarsemetro_jax.convert`.
    variables: the model's {'params', 'batch_stats'} (arrays, possibly
      sharded, or jax.ShapeDtypeStruct); defines the expected shapes and the
      shardings of the result.
  Returns:
    New variables: the checkpoint's values; for a backbone-only checkpoint the
    backbone subtree is replaced and everything else kept from `variables`;
    likewise the SMPL-parameter head when the checkpoint has none (warning).
  Raises:
    ValueError: listing missing, unexpected and mis-shaped leaves.
  """
  loaded, metadata = read_converted(directory)
  loaded.pop(CARRIED, None)   # no Flax counterpart: for --to-torch only
  scope = metadata.get('scope', 'model')
  flat_want = {f'{c}/{p}': v for c in variables
               for p, v in state_dict_lib.flatten(variables[c]).items()}
  flat_got = {f'{c}/{p}': v for c in loaded
              for p, v in state_dict_lib.flatten(loaded[c]).items()}
  if scope == 'backbone':
    want = {p: v for p, v in flat_want.items() if p.split('/')[1] == 'backbone'}
  elif scope == 'model':
    want = flat_want
  else:
    raise ValueError(f'{directory}: unknown conversion scope {scope!r}')
  problems = []
  missing = [p for p in want if p not in flat_got]
  # FastMETRO trains its SMPL-parameter head on a trained network (loaded with
  # strict=False): a checkpoint with none of the head's leaves fills the rest,
  # and the head keeps the (concrete) values in `variables`.
  head = [p for p in missing if _HEAD in p.split('/')]
  if (head and not any(_HEAD in p.split('/') for p in flat_got)
      and not any(isinstance(want[p], jax.ShapeDtypeStruct) for p in head)):
    logging.warning('%s has no SMPL-parameter head: its %d leaves keep their initial values',
                    directory, len(head))
    want = {p: v for p, v in want.items() if p not in head}
    missing = [p for p in missing if p not in head]
  unexpected = [p for p in flat_got if p not in want]
  bad = [f'{p}: checkpoint {list(np.shape(flat_got[p]))} {np.asarray(flat_got[p]).dtype}, '
         f'model {list(want[p].shape)} {np.dtype(want[p].dtype)}'
         for p in want if p in flat_got and (
             tuple(np.shape(flat_got[p])) != tuple(want[p].shape)
             or np.asarray(flat_got[p]).dtype != np.dtype(want[p].dtype))]
  if missing:
    problems.append(state_dict_lib.listing('missing in the checkpoint', missing))
  if unexpected:
    problems.append(state_dict_lib.listing('not in the model', unexpected))
  if bad:
    problems.append(state_dict_lib.listing('mis-shaped or mis-typed', bad))
  if problems:
    kind = metadata.get('kind', 'unknown kind')
    raise ValueError(f'{directory} ({kind}, scope {scope}) does not fit the model:\n'
                     + '\n'.join(problems))

  def place(path, old):
    if path not in want:
      return old
    sharding = getattr(old, 'sharding', None)
    return jax.device_put(flat_got[path], sharding) if sharding is not None else jax.numpy.asarray(flat_got[path])

  out = {}
  for c in variables:
    flat = {p: place(f'{c}/{p}', v) for p, v in state_dict_lib.flatten(variables[c]).items()}
    out[c] = state_dict_lib.unflatten(flat)
  return out
