"""State dict <-> Flax variables through a table, with strict accounting.

`to_flax` converts a PyTorch state dict (name -> numpy array) into Flax
variables {'params', 'batch_stats'} shaped like `target` (the abstract tree of
`jax.eval_shape(model.init, ...)`). It refuses to return a partial result:

* every source key is converted exactly once, carried (a `carried` row of
  the table, or a BatchNorm `num_batches_tracked`: no Flax counterpart, kept
  unchanged in `Report.carried`) or deliberately dropped (`Table.ignored`),
* every Flax leaf of `target` is filled exactly once,
* shapes match after the layout change, and dtypes match; only lossless
  widening of floats (float16/bfloat16 -> float32) is accepted,

otherwise a `ConversionError` lists the missing, unexpected and mis-shaped
keys. `to_torch` is the inverse: given the carried tensors back it writes
the source's keys and tensors exactly (torch -> Flax -> torch is lossless),
and Flax -> torch -> Flax is bit-exact.
"""

import collections
import dataclasses

import jax
import ml_dtypes
import numpy as np

from coarsemetro_jax.convert import tables

MAX_LISTED = 12  # keys listed per category in an error message

# Float widenings that lose nothing (a half checkpoint loaded into float32).
_LOSSLESS = {
    (np.dtype(np.float16), np.dtype(np.float32)),
    (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)),
}


class ConversionError(ValueError):
  """A checkpoint does not match the model (missing/extra/mis-shaped keys)."""


@dataclasses.dataclass
class Report:
  """What a conversion did, for the summary table."""

  converted: list[tuple[str, str, tuple[int, ...], str]]  # torch key, flax path, shape, dtype
  ignored: list[str]  # dropped: keys of `Table.ignored`
  widened: list[str]
  # torch key -> np.ndarray, in source order: tensors with no Flax counterpart
  # that travel with the converted checkpoint (`to_torch(..., carried=)`).
  carried: dict = dataclasses.field(default_factory=collections.OrderedDict)

  def summary(self, group_depth=1):
    """Markdown table: tensors, parameters and BatchNorm statistics per module."""
    groups = collections.OrderedDict()
    for key, path, shape, _ in self.converted:
      name = '.'.join(key.split('.')[:group_depth])
      count, params, stats = groups.get(name, (0, 0, 0))
      n = tables.num_params(shape)
      is_stat = path.startswith('batch_stats/')
      groups[name] = (count + 1, params + (0 if is_stat else n), stats + (n if is_stat else 0))
    lines = ['| module | tensors | parameters | BN statistics |', '|---|---:|---:|---:|']
    lines += [f'| {n} | {c} | {p:,} | {s:,} |' for n, (c, p, s) in groups.items()]
    totals = [sum(g[i] for g in groups.values()) for i in range(3)]
    lines.append(f'| **total** | {totals[0]} | {totals[1]:,} | {totals[2]:,} |')
    counters = [k for k in self.carried if k.endswith('.num_batches_tracked')]
    others = [k for k in self.carried if not k.endswith('.num_batches_tracked')]
    if counters:
      lines.append(f'\ncarried {len(counters)} BatchNorm num_batches_tracked counters')
    if others:
      shown = ', '.join(others[:8]) + (' ...' if len(others) > 8 else '')
      n = sum(tables.num_params(self.carried[k].shape) for k in others)
      lines.append(
          f'carried {len(others)} source tensors with no Flax counterpart '
          f'({n:,} values; kept with the checkpoint, written back by --to-torch): '
          f'{shown}'
      )
    if self.ignored:
      shown = ', '.join(self.ignored[:8]) + (' ...' if len(self.ignored) > 8 else '')
      lines.append(f'dropped {len(self.ignored)} source keys (deliberately): {shown}')
    if self.widened:
      lines.append(f'widened {len(self.widened)} float16/bfloat16 tensors to float32')
    return '\n'.join(lines)


def flatten(tree, sep='/'):
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[sep.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)] = leaf
  return out


def unflatten(flat, sep='/'):
  """{'a/b/c': leaf} -> nested dict."""
  tree = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def listing(title, items):
  """'  title (n): a, b, ... and k more' in natural order."""
  items = sorted(items, key=tables.natural_key)
  more = f' ... and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED else ''
  return f'  {title} ({len(items)}): ' + ', '.join(items[:MAX_LISTED]) + more


def _raise(problems, what):
  if problems:
    raise ConversionError(f'{what}:\n' + '\n'.join(problems))


def to_flax(state_dict, table, target, source='checkpoint'):
  """Converts a state dict; returns ({'params', 'batch_stats'}, Report).

  Args:
    state_dict: mapping torch key -> np.ndarray.
    table: `tables.Table` of the model.
    target: abstract (or concrete) variables {'params': ..., 'batch_stats': ...};
      only shapes and dtypes are used.
    source: name used in error messages (the file).
  Raises:
    ConversionError: listing every missing, unexpected, mis-shaped or
      mis-typed key (nothing is returned then).
  """
  tables.check_table(table)
  leaves, ignorable = tables.expand(table)
  by_torch = {leaf.torch: leaf for leaf in leaves}
  flat_target = {f'{c}/{p}': v for c in target for p, v in flatten(target[c]).items()}
  ignorable = set(ignorable)

  missing = [k for k in by_torch if k not in state_dict]
  carried = [
      k
      for k in state_dict
      if k not in by_torch and (k in ignorable or tables.carrying_module(k, table))
  ]
  unexpected = [
      k
      for k in state_dict
      if k not in by_torch and k not in carried and not tables.is_ignored(k, table)
  ]
  unfilled = [
      p for p in flat_target if p not in {f'{leaf.collection}/{leaf.flax}' for leaf in leaves}
  ]
  unknown = [
      f'{leaf.torch} -> {leaf.collection}/{leaf.flax}'
      for leaf in leaves
      if f'{leaf.collection}/{leaf.flax}' not in flat_target
  ]
  problems = []
  if missing:
    problems.append(listing('missing keys (in the model, not in the file)', missing))
  if unexpected:
    problems.append(listing('unexpected keys (in the file, not in the model)', unexpected))
  if unfilled:
    problems.append(listing('Flax leaves no key fills (table/model mismatch)', unfilled))
  if unknown:
    problems.append(listing('table entries with no Flax leaf (table/model mismatch)', unknown))

  flat_out, converted, widened, bad = {}, [], [], []
  for leaf in leaves:
    path = f'{leaf.collection}/{leaf.flax}'
    if leaf.torch not in state_dict or path not in flat_target:
      continue
    src = np.asarray(state_dict[leaf.torch])
    want = flat_target[path]
    value = tables.TO_FLAX[leaf.layout](src) if src.ndim == _ndim(leaf.layout, src) else None
    if value is None or value.shape != tuple(want.shape):
      expected = _torch_shape(leaf.layout, tuple(want.shape))
      bad.append(f'{leaf.torch}: file {list(src.shape)}, model expects {list(expected)}')
      continue
    if value.dtype != np.dtype(want.dtype):
      if (value.dtype, np.dtype(want.dtype)) not in _LOSSLESS:
        bad.append(
            f'{leaf.torch}: file dtype {value.dtype}, model expects ' f'{np.dtype(want.dtype)}'
        )
        continue
      widened.append(leaf.torch)
    flat_out[path] = np.array(value, dtype=want.dtype, order='C')  # own copy
    converted.append((leaf.torch, path, tuple(value.shape), str(value.dtype)))
  if bad:
    problems.append(listing('mis-shaped or mis-typed keys', bad))
  _raise(problems, f'{source} does not match the model')

  carried = set(carried)
  ignored = sorted(
      (k for k in state_dict if k not in by_torch and k not in carried), key=tables.natural_key
  )
  out = {
      c: unflatten({p[len(c) + 1 :]: v for p, v in flat_out.items() if p.startswith(c + '/')})
      for c in target
  }
  kept = collections.OrderedDict(
      (k, np.array(v)) for k, v in state_dict.items() if k in carried
  )  # own copies, source order
  return out, Report(converted, ignored, widened, kept)


def _ndim(layout, src):
  return {'linear': 2, 'conv': 4}.get(layout, src.ndim)


def _torch_shape(layout, flax_shape):
  if layout == 'linear' and len(flax_shape) == 2:
    return flax_shape[::-1]
  if layout == 'conv' and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return flax_shape


def to_torch(variables, table, num_batches_tracked=0, carried=None):
  """Flax variables -> ordered state dict (torch key -> np.ndarray), strictly.

  Args:
    variables: {'params', 'batch_stats'} of the table's model.
    table: `tables.Table`.
    num_batches_tracked: the BatchNorm counter (not tracked by Flax, int64
      scalar) written where `carried` has none, so that a strict
      `load_state_dict` accepts the file.
    carried: `Report.carried` of the conversion (torch key -> array): written
      back unchanged, each at its carried row's place (counters after their
      BatchNorm's running_var). A carried row with no tensors here is left out
      (`missing_carried` names them).
  Raises:
    ConversionError: variables and table disagree, or a carried tensor has
      no carried row (or BatchNorm) to go to.
  """
  tables.check_table(table)
  leaves, ignorable = tables.expand(table)
  flat = {f'{c}/{p}': v for c in variables for p, v in flatten(variables[c]).items()}
  used = {f'{leaf.collection}/{leaf.flax}' for leaf in leaves}
  problems = []
  missing = [
      f'{leaf.collection}/{leaf.flax}'
      for leaf in leaves
      if f'{leaf.collection}/{leaf.flax}' not in flat
  ]
  extra = [p for p in flat if p not in used]
  if missing:
    problems.append(listing('Flax leaves the table needs but the variables lack', missing))
  if extra:
    problems.append(listing('Flax leaves not covered by the table', extra))
  carried = carried or {}
  homeless = [k for k in carried if k not in ignorable and not tables.carrying_module(k, table)]
  if homeless:
    problems.append(listing('carried tensors the table has no place for', homeless))
  _raise(problems, 'variables do not match the conversion table')
  nbt = {k.rsplit('.', 1)[0]: k for k in ignorable}
  out = collections.OrderedDict()
  for r in table.rows:
    if r.kind in tables.CARRIED_KINDS:
      out.update(
          (k, np.asarray(v))
          for k, v in carried.items()
          if tables.carrying_module(k, table) == r.torch
      )
    for leaf in tables.expand_row(r)[0]:
      value = np.asarray(flat[f'{leaf.collection}/{leaf.flax}'])
      out[leaf.torch] = np.array(tables.TO_TORCH[leaf.layout](value), order='C')
      module = leaf.torch.rsplit('.', 1)[0]
      if leaf.torch.endswith('running_var') and module in nbt:
        key = nbt[module]
        out[key] = np.asarray(
            carried[key] if key in carried else np.array(num_batches_tracked, np.int64)
        )
  return out


def missing_carried(table, carried):
  """Carried (not optional) rows of `table` without any tensor in `carried` (a
  trained or older checkpoint has none): the export lacks their keys."""
  have = {tables.carrying_module(k, table) for k in carried or {}}
  return [m for m in tables.carried_modules(table, ('carried',)) if m not in have]


def torch_shapes(table, target):
  """The state dict a model's table expects: torch key -> shape, in table order.

  `target` is the model's (abstract) variables; BatchNorm `num_batches_tracked`
  buffers appear as scalars after their `running_var`.
  """
  leaves, ignorable = tables.expand(table)
  flat = {f'{c}/{p}': v for c in target for p, v in flatten(target[c]).items()}
  nbt = {k.rsplit('.', 1)[0]: k for k in ignorable}
  out = collections.OrderedDict()
  for leaf in leaves:
    out[leaf.torch] = _torch_shape(leaf.layout, tuple(flat[f'{leaf.collection}/{leaf.flax}'].shape))
    module = leaf.torch.rsplit('.', 1)[0]
    if leaf.torch.endswith('running_var') and module in nbt:
      out[nbt[module]] = ()
  return out
