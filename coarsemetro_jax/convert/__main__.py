"""Command line: PyTorch checkpoint -> orbax checkpoint for `config.init_from`, and back.

  # FastMETRO release -> JAX (kind detected from the keys)
  python -m coarsemetro_jax.convert --src FastMETRO-S-R50_h36m_state_dict.bin \
      --out runs/converted/FastMETRO-S-R50_h36m
  # FastMETRO's FreiHAND hand network (kind fastmetro-L-h64-hand)
  python -m coarsemetro_jax.convert --src FastMETRO-L-H64_freihand_state_dict.bin \
      --out runs/converted/FastMETRO-L-H64_freihand --config configs/hand_h64.py:fastmetro-L
  # ImageNet ResNet-50 for training CoarseMETRO from scratch (backbone only)
  python -m coarsemetro_jax.convert --src resnet50-0676ba61.pth --out runs/resnet50_imagenet
  # A JAX checkpoint (converted or trained) -> PyTorch state dict
  python -m coarsemetro_jax.convert --to-torch --src runs/r50/checkpoints/60000 \
      --config configs/r50.py --out coarsemetro_s_r50.pth

--config (path[:arg], default configs/r50.py) supplies the model fields the kind
does not fix (CoarseMETRO widths/stages, image size); it must build the same
model as the checkpoint. Nothing is written when the conversion fails.
Source tensors with no Flax counterpart (HRNet's classifier, BatchNorm
counters) travel with the converted directory and --to-torch writes them
back: converting a PyTorch file and exporting it again gives the same keys
and tensors.
"""

import argparse
import os
import sys
import time

import ml_collections

from coarsemetro_jax import checkpoints
from coarsemetro_jax.convert import kinds
from coarsemetro_jax.convert import orbax_variables
from coarsemetro_jax.convert import state_dict as state_dict_lib
from coarsemetro_jax.convert import tables
from coarsemetro_jax.convert import torch_writer

PROGRESS_MIN_BYTES = 32 << 20  # show a progress line for files above 32 MiB


def _progress_printer(path):
  """A throttled one-line progress display on stderr for big files."""
  if os.path.getsize(path) < PROGRESS_MIN_BYTES:
    return None
  start = last = time.time()

  def show(done, total):
    nonlocal last
    now = time.time()
    if done < total and now - last < 0.5:
      return
    last = now
    print(
        f'\rreading {os.path.basename(path)}: {done / 2**20:7.1f} / {total / 2**20:.1f} MiB '
        f'({now - start:4.1f} s)',
        end='\n' if done >= total else '',
        file=sys.stderr,
        flush=True,
    )

  return show


def _model_differences(a, b):
  a, b = a.to_dict(), b.to_dict()
  return [
      f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
  ]


def _check_paths(src, out, kind):
  """Before any reading: --out must be new and --src must exist."""
  if os.path.exists(out):
    raise FileExistsError(f'{out} already exists; choose a new --out {kind}')
  if not os.path.exists(src):
    raise FileNotFoundError(f'--src {src} does not exist')


def to_jax(src, out, kind='', config_spec=''):
  """Converts a PyTorch file; returns the conversion Report."""
  _check_paths(src, out, 'directory')
  config = kinds.load_config(config_spec)
  state, notes = orbax_variables.read_state_dict(src, progress=_progress_printer(src))
  for note in notes:
    print(f'{src}: {note}')
  kind = kinds.normalize_kind(kind) if kind else kinds.detect_kind(state, config)
  kind_config, scope = kinds.apply_kind(kind, config)
  if config_spec:
    diff = _model_differences(kind_config.model, config.model)
    if diff:
      raise ValueError(
          f'{src} is a {kind} checkpoint but --config {config_spec} builds '
          f'{kinds.kind_of(config.model)} (differing model fields: '
          f'{"; ".join(diff)}); use a config of that model'
      )
  print(
      f'{src}: {kind} ({"backbone only" if scope == "backbone" else "whole model"}, '
      f'{len(state)} tensors)'
  )
  table = tables.model_table(kind_config.model, scope)
  target = kinds.abstract_variables(kind_config, scope)
  variables, report = state_dict_lib.to_flax(state, table, target, source=src)
  print(report.summary())
  orbax_variables.save_converted(
      out,
      variables,
      {
          'kind': kind,
          'scope': scope,
          'source': os.path.abspath(src),
          'model': kind_config.model.to_dict(),
          'converted_tensors': len(report.converted),
          'ignored_keys': report.ignored,
      },
      carried=report.carried,
  )
  print(f'wrote {out}')
  return report


def to_torch(src, out, kind='', config_spec=''):
  """Writes a JAX checkpoint (converted, training step or workdir) as a PyTorch state dict file."""
  _check_paths(src, out, 'file')
  variables, metadata = checkpoints.read_variables(src)
  carried = variables.pop(orbax_variables.CARRIED, {})
  if config_spec or kind:
    config = kinds.load_config(config_spec)
    scope = 'model'
    if kind:
      config, scope = kinds.apply_kind(kind, config)
    model_config = config.model
  elif metadata.get('model'):
    model_config = ml_collections.ConfigDict(metadata['model'])
    scope = metadata.get('scope', 'model')
  else:
    raise ValueError(
        f'{src} was not written by this converter: pass --config '
        '(and --kind for a backbone-only checkpoint)'
    )
  if scope == 'model':
    orbax_variables.check_same_network(
        orbax_variables.mesh_network(state_dict_lib.flatten(variables)),
        'hand' if tables.is_hand(model_config) else 'body',
        src,
        metadata.get('kind', 'checkpoint'),
    )
  table = tables.model_table(model_config, scope)
  state = state_dict_lib.to_torch(variables, table, carried=carried)
  for module in state_dict_lib.missing_carried(table, carried):
    print(
        f'note: {src} holds no {module}.* (a source module with no Flax counterpart, '
        'kept only by a conversion); the file lacks it: load it with strict=False'
    )
  torch_writer.save(state, out)
  n = sum(
      tables.num_params(v.shape)
      for k, v in state.items()
      if not k.endswith(('num_batches_tracked', 'running_mean', 'running_var'))
  )
  print(
      f'wrote {out}: {len(state)} tensors, {n:,} parameters '
      f'({kinds.kind_of(model_config, scope)})'
  )
  return state


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m coarsemetro_jax.convert',
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Kinds: resnet50-imagenet, fastmetro-{S,M,L}-{r50,h64}, coarsemetro-S-{r50,h64}, '
      'each with -smplparam for the SMPL-parameter head or -hand for the hand network '
      '(detected from the keys unless --kind is given).',
  )
  parser.add_argument(
      '--src',
      required=True,
      help='PyTorch .pth/.bin/.pt file (or, with --to-torch, a JAX checkpoint dir)',
  )
  parser.add_argument(
      '--out',
      required=True,
      help='new orbax checkpoint directory (or, with --to-torch, a .pth file)',
  )
  parser.add_argument('--kind', default='', help='checkpoint kind; overrides detection')
  parser.add_argument(
      '--config', default='', help='config file[:arg] of the model (default configs/r50.py)'
  )
  parser.add_argument(
      '--to-torch', action='store_true', help='convert a JAX checkpoint into a PyTorch state dict'
  )
  args = parser.parse_args(argv)
  try:
    if args.to_torch:
      to_torch(args.src, args.out, args.kind, args.config)
    else:
      to_jax(args.src, args.out, args.kind, args.config)
  except (ValueError, FileExistsError, FileNotFoundError, NotImplementedError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
