"""Parameters, FLOPs and activation counts of a configured model (paper Table 1).

  python -m coarsemetro_jax.profile --config=configs/r50.py
  python -m coarsemetro_jax.profile --config=configs/fastmetro.py:S-r50
  python -m coarsemetro_jax.profile --config=configs/hand_r50.py:fastmetro-S \
      --config.topology.hierarchy=/data/mano/mano_downsampling.npz

Counts come from the traced computation (the jaxpr of `model.apply` at batch 1,
eval mode) with fvcore's conventions, which the paper used:
  * FLOPs: one multiply-add = one FLOP. `dot_general` (linear layers, attention
    matmuls, token-axis linears) counts out_elements x contracted size;
    `conv_general_dilated` counts out_elements x C_in/groups x kernel area;
    LayerNorm counts 5 x input elements (fvcore's affine norm estimate) and
    eval-mode BatchNorm 2 x input elements. Element-wise ops, softmax and
    gathers count 0, as in fvcore.
  * Activations: output elements of conv / linear / matmul ops.
Each operation is attributed to the Flax module that issued it (the jaxpr name
stack). Scopes, chosen because they reproduce the paper's FastMETRO rows:
  * transformer params: everything but the backbone and the learned
    431 -> 1723 up-sampling layer (conv_1x1, tokens and heads included);
  * transformer FLOPs and activations: the encoder-decoder blocks
    (`transformer_*` modules). The small layers around them (conv_1x1, width
    reductions, token up-samplers, heads) are reported separately as
    "non-backbone" figures; counting them in moves FastMETRO-S from 2.22 to
    2.31 GFLOPs and 7.64M to 7.74M activations (paper: 2.2G, 7.6M), while the
    per-layer increments S -> M -> L match the paper either way.
The FastMETRO paper predates the learned up-sampling layer, so its figures
exclude it; the CoarseMETRO paper's 11.6M equals its overall count minus the
backbone (35.1M - 23.5M), i.e. the non-backbone column, learned layer included.
Hand networks (config.model.hand, labels '...-Hand') have no learned
up-sampling layer, so their transformer and non-backbone params are equal;
neither paper gives hand figures.
"""

import collections
import dataclasses

from absl import flags
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import build
from coarsemetro_jax import config_files
from coarsemetro_jax.models import batch_norm
from coarsemetro_jax.models import fastmetro

EXCLUDED_FROM_TRANSFORMER_PARAMS = (fastmetro.UPSAMPLE_MODULE,)
# Paper Table 1: transformer params (M), GFLOPs, activations (M), overall params (M).
PAPER_TABLE1 = {
    'FastMETRO-S-R50': (9.2, 2.2, 7.6, 32.7),
    'FastMETRO-M-R50': (17.1, 4.4, 15.3, 40.6),
    'FastMETRO-L-R50': (24.9, 6.6, 22.9, 48.4),
    'FastMETRO-L-H64': (24.9, 6.6, 22.9, 153.0),
    'CoarseMETRO-S-R50': (11.6, 0.6, 4.5, 35.1),
    'CoarseMETRO-S-H64': (11.6, 0.6, 4.5, 139.7),
}


@dataclasses.dataclass
class Counts:
  flops: float = 0.0
  activations: float = 0.0

  def __add__(self, other):
    return Counts(self.flops + other.flops, self.activations + other.activations)


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for p in (param if isinstance(param, (tuple, list)) else (param,)):
      if hasattr(p, 'eqns'):
        yield p
      elif hasattr(p, 'jaxpr') and hasattr(p.jaxpr, 'eqns'):
        yield p.jaxpr


def _eqn_counts(eqn):
  """fvcore-convention counts of one primitive (0 for everything but conv/matmul)."""
  name = eqn.primitive.name
  if name == 'dot_general':
    out = eqn.outvars[0].aval.shape
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    contracted = int(np.prod([lhs[d] for d in lhs_contract]))
    return Counts(np.prod(out) * contracted, np.prod(out))
  if name == 'conv_general_dilated':
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params['dimension_numbers']
    kernel_in = rhs[dn.rhs_spec[1]]  # C_in / groups
    kernel_area = int(np.prod([rhs[d] for d in dn.rhs_spec[2:]]))
    return Counts(np.prod(out) * kernel_in * kernel_area, np.prod(out))
  return Counts()


def _scope_of(eqn, prefix):
  return (prefix + str(eqn.source_info.name_stack)).strip('/')


def count_jaxpr(jaxpr, by_scope=None, scope_depth=2, scope_prefix=''):
  """Sums fvcore-style counts over a (closed) jaxpr, recursing into sub-jaxprs.

  If `by_scope` (a defaultdict(Counts)) is given, counts are also accumulated
  per name-stack prefix of `scope_depth` components (e.g. 'CoarseMETRO/backbone').
  A cond's branches are traced with their own name stacks: `scope_prefix` is
  the cond's.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = Counts()
  for eqn in jaxpr.eqns:
    subs = list(_sub_jaxprs(eqn))
    if eqn.primitive.name == 'cond':
      # One branch runs (lax.platform_dependent's branches compute the same
      # function for different backends): count one, not their sum; the
      # largest, and of equals the one with the fewest outputs (a convolution
      # rather than its per-tap dots).
      branches = []
      for sub in subs:
        scoped = collections.defaultdict(Counts) if by_scope is not None else None
        prefix = _scope_of(eqn, scope_prefix)
        branches.append((count_jaxpr(sub, scoped, scope_depth, prefix + '/'), scoped))
      counts, scoped = max(branches, key=lambda b: (b[0].flops, -b[0].activations))
      total = total + counts
      for scope, c in (scoped or {}).items():
        by_scope[scope] = by_scope[scope] + c
      continue
    if subs:
      for sub in subs:
        total = total + count_jaxpr(sub, by_scope, scope_depth, scope_prefix)
      continue
    c = _eqn_counts(eqn)
    if c.flops or c.activations:
      total = total + c
      if by_scope is not None:
        scope = '/'.join(_scope_of(eqn, scope_prefix).split('/')[:scope_depth])
        by_scope[scope] = by_scope[scope] + c
  return total


def _norm_flops(model, variables, images):
  """fvcore's LayerNorm (5/elem) and eval BatchNorm (2/elem) FLOPs per top-level module."""
  flops = collections.Counter()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    norms = (nn.LayerNorm, nn.BatchNorm, batch_norm.BatchNorm)
    if context.method_name == '__call__' and isinstance(module, norms):
      per_element = 5 if isinstance(module, nn.LayerNorm) else 2
      top = module.path[0] if module.path else ''
      flops[top] += per_element * int(np.prod(args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return flops


def profile_model(model, image_size=224):
  """Returns a dict of parameter / FLOP / activation counts for batch 1."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)}, x), images
  )
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  sizes = {k: int(np.prod(v.shape)) for k, v in flat.items()}
  backbone_params = sum(v for k, v in sizes.items() if k.startswith('backbone/'))
  total_params = sum(sizes.values())
  excluded = sum(v for k, v in sizes.items() if k.split('/')[0] in EXCLUDED_FROM_TRANSFORMER_PARAMS)

  by_scope = collections.defaultdict(Counts)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  total = count_jaxpr(jaxpr, by_scope, scope_depth=2)
  top = lambda scope: scope.split('/')[1] if '/' in scope else ''
  backbone = sum((c for s, c in by_scope.items() if top(s) == 'backbone'), Counts())
  blocks = sum((c for s, c in by_scope.items() if top(s).startswith('transformer_')), Counts())
  norms = _norm_flops(model, variables, images)
  norm_backbone = norms['backbone']
  norm_blocks = sum(v for k, v in norms.items() if k.startswith('transformer_'))
  return {
      'total_params': total_params,
      'backbone_params': backbone_params,
      'transformer_params': total_params - backbone_params - excluded,
      'non_backbone_params': total_params - backbone_params,
      'total_gflops': (total.flops + sum(norms.values())) / 1e9,
      'backbone_gflops': (backbone.flops + norm_backbone) / 1e9,
      'transformer_gflops': (blocks.flops + norm_blocks) / 1e9,
      'non_backbone_gflops': (total.flops - backbone.flops + sum(norms.values()) - norm_backbone)
      / 1e9,
      'transformer_activations': blocks.activations,
      'non_backbone_activations': total.activations - backbone.activations,
      'total_activations': total.activations,
  }


def model_label(config):
  """'CoarseMETRO-S-R50'-style name of a config (matches PAPER_TABLE1 keys).

  Hand networks end in '-Hand' ('FastMETRO-L-H64-Hand').
  """
  m = config.model
  backbone = {'resnet50': 'R50', 'hrnet': f'H{m.hrnet_width}'}.get(m.backbone, m.backbone)
  hand = '-Hand' if m.get('hand', False) else ''
  if m.name == 'fastmetro':
    return f"FastMETRO-{'SML'[m.fastmetro_layers - 1]}-{backbone}{hand}"
  return f'CoarseMETRO-S-{backbone}{hand}'


def format_table(rows):
  """Markdown table of (label, counts) rows next to the paper's Table 1."""
  lines = [
      '| model | transformer params (M) | non-backbone params (M) | transformer GFLOPs '
      '| transformer activations (M) | total params (M) '
      '| paper: params / GFLOPs / activations / total |',
      '|---|---|---|---|---|---|---|',
  ]
  for label, c in rows:
    paper = PAPER_TABLE1.get(label)
    paper_str = ' / '.join(f'{p}' for p in paper) if paper else '-'
    lines.append(
        f"| {label} | {c['transformer_params'] / 1e6:.2f} | "
        f"{c['non_backbone_params'] / 1e6:.2f} | {c['transformer_gflops']:.2f} | {c['transformer_activations'] / 1e6:.2f} | "
        f"{c['total_params'] / 1e6:.1f} | {paper_str} |"
    )
  return '\n'.join(lines)


def _define_flags():
  """Command-line flags (defined only when run as a program)."""
  config_files.define_flag('config', 'Model configuration file.')
  flags.DEFINE_integer('image_size', 224, 'Input resolution.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  config = flags.FLAGS.config
  try:
    model = build.build(config, body=False).model
    counts = profile_model(model, flags.FLAGS.image_size)
  except ValueError as e:  # a missing or mismatched mesh file, a config value out of its choices
    raise SystemExit(f'profile: {e}') from None
  print(format_table([(model_label(config), counts)]))
  print(
      f"\nbackbone: {counts['backbone_params'] / 1e6:.2f}M params, "
      f"{counts['backbone_gflops']:.2f} GFLOPs; whole model {counts['total_gflops']:.2f} "
      f"GFLOPs, {counts['total_activations'] / 1e6:.2f}M activations"
  )


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
