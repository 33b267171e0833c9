"""The optimiser: lr schedules, parameter groups with lr multipliers, clipped AdamW.

TF-free core, used by the train step (`steps`) and by the loop.
"""

import flax
import jax
import optax

from coarsemetro_jax.models import fastmetro


def total_train_steps(config, steps_per_epoch=None):
  """config.num_train_steps if > 0, else num_epochs * steps_per_epoch (or None)."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch if steps_per_epoch else None


def learning_rate_fn(optim_config, steps_per_epoch=None, total_steps=None):
  """The lr per step of `optim_config.schedule`.

  'step': constant lr, or PyTorch StepLR(lr_drop_epochs, lr_drop_factor)
    stepped once per epoch (FastMETRO's; lr_drop_epochs 0 = constant).
  'cosine': linear warm-up from 0 over `warmup_steps`, then cosine decay to
    0 at `total_steps` (short runs from scratch).
  'linear': the same warm-up, then a straight line to 0 at `total_steps`
    (configs/embedded.py).
  """
  lr = optim_config.lr
  if optim_config.schedule in ('cosine', 'linear'):
    if not total_steps:
      raise ValueError(
          f'config.optim.schedule={optim_config.schedule!r} needs the '
          "run's total steps (config.num_train_steps, or num_epochs and "
          'steps_per_epoch)'
      )
    warmup = min(optim_config.warmup_steps, total_steps - 1)
    if optim_config.schedule == 'cosine':
      return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup),
            optax.linear_schedule(lr, 0.0, total_steps - warmup),
        ],
        [warmup],
    )
  if optim_config.schedule != 'step':
    raise ValueError(
        "config.optim.schedule must be 'step', 'cosine' or 'linear', "
        f'got {optim_config.schedule!r}'
    )
  if optim_config.lr_drop_epochs <= 0:
    return optax.constant_schedule(lr)
  if not steps_per_epoch:
    raise ValueError(
        'config.optim.lr_drop_epochs > 0 needs steps_per_epoch '
        '(StepLR is stepped once per epoch)'
    )
  return optax.exponential_decay(
      lr,
      transition_steps=optim_config.lr_drop_epochs * steps_per_epoch,
      decay_rate=optim_config.lr_drop_factor,
      staircase=True,
  )


# `optim.upsample_lr_mult` scales the lr of the learned mesh up-sampling
# (431 -> 1723, `fastmetro.UPSAMPLE_MODULE`).
# The SMPL-parameter head: its own group, so that it can train on an otherwise
# frozen network (`optim.rest_lr_mult` = backbone = upsample = 0).
SMPL_HEAD_MODULE = 'smpl_parameter_regressor'


def param_labels(params):
  """Optimizer group of every leaf.

  'backbone' under a module named 'backbone', 'upsample' under the learned
  mesh up-sampling (`fastmetro.UPSAMPLE_MODULE`), 'smpl_head' under the SMPL-parameter
  head (`SMPL_HEAD_MODULE`), else 'rest'.
  """

  def label(path, _):
    if 'backbone' in path:
      return 'backbone'
    if SMPL_HEAD_MODULE in path:
      return 'smpl_head'
    return 'upsample' if fastmetro.UPSAMPLE_MODULE in path else 'rest'

  return flax.traverse_util.path_aware_map(label, params)


def group_lr_multipliers(optim_config):
  """lr multiplier of each `param_labels` group."""
  c = optim_config
  return {
      'backbone': c.backbone_lr_mult,
      'upsample': c.upsample_lr_mult,
      'smpl_head': 1.0,
      'rest': c.rest_lr_mult,
  }


def stop_frozen_gradients(params, optim_config):
  """`lax.stop_gradient` on the groups whose lr multiplier is 0.

  A frozen group's gradient is then zero by construction: XLA drops its
  backward work (the 431 -> 1723 layer's weight gradient, or the whole
  backbone's backward pass), and it does not count in the clipping norm, as
  PyTorch's `clip_grad_norm_` skips parameters with `requires_grad=False`.
  """
  frozen = {k for k, m in group_lr_multipliers(optim_config).items() if not m}
  if not frozen:
    return params
  return jax.tree.map(
      lambda label, p: jax.lax.stop_gradient(p) if label in frozen else p,
      param_labels(params),
      params,
  )


def make_optimizer(optim_config, steps_per_epoch=None, total_steps=None):
  """Global-norm clipping then AdamW (decoupled decay on every parameter).

  `grad_clip_norm` 0 turns clipping off (DETR's / FastMETRO's `clip_max_norm`).
  The backbone's, the learned up-sampling's and the other non-head parameters'
  lr are the schedule times `backbone_lr_mult` / `upsample_lr_mult` /
  `rest_lr_mult`; the SMPL-parameter head always gets the schedule itself.
  Returns (optax transform, lr schedule of the other parameters).
  """
  c = optim_config
  lr_fn = learning_rate_fn(c, steps_per_epoch, total_steps)

  def adamw(mult):
    return optax.adamw(
        lambda step: mult * lr_fn(step), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay
    )

  mults = group_lr_multipliers(c)
  if all(m == 1.0 for m in mults.values()):
    inner = adamw(1.0)
  else:
    # A group with multiplier 0 is frozen: no AdamW moments to keep or update
    # (and the train step gives it no gradient: `stop_frozen_gradients`).
    inner = optax.multi_transform(
        {k: adamw(m) if m else optax.set_to_zero() for k, m in mults.items()}, param_labels
    )
  if c.grad_clip_norm < 0:
    raise ValueError(
        'config.optim.grad_clip_norm must be >= 0 (0: no clipping), ' f'got {c.grad_clip_norm}'
    )
  if c.grad_clip_norm == 0:
    return inner, lr_fn
  return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), inner), lr_fn
