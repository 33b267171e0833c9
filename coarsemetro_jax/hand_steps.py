"""Jitted train and eval steps of the hand networks (config.model.hand).

The body's steps (steps.py: sharding, BatchNorm groups, rng, frozen groups,
donation) with the hand model in place of the body model: the GT mesh is
`hand_losses.ground_truth_mesh` inside the step, the loss
`hand_losses.compute_loss`, and the eval collection `metrics.HandEvalMetrics`
(PA-MPJPE, PA-MPVPE, F@5 mm, F@15 mm). With `config.eval_flip` the eval
averages with the mirrored image's prediction (`mirror.hand_flip_test`).

Hand batches are the body's dict with joints_2d [B, 21, 3], joints_3d
[B, 21, 4], pose [B, 48] (MANO), betas [B, 10] and, optionally,
`hand_losses.LEFT_KEY` [B] (1 = left hand).
"""

import jax
import jax.numpy as jnp
import optax

from coarsemetro_jax import hand_losses
from coarsemetro_jax import hand_model as hand_model_lib
from coarsemetro_jax import losses
from coarsemetro_jax import metrics
from coarsemetro_jax import mirror
from coarsemetro_jax import steps

# Per-example shapes of the hand batch's labels (the others are the body's).
LABEL_SHAPES = {
    'joints_2d': (hand_model_lib.NUM_HAND_JOINTS, 3),
    'joints_3d': (hand_model_lib.NUM_HAND_JOINTS, 4),
    'pose': (3 * hand_model_lib.NUM_MANO_JOINTS,),
}


def make_train_step(config, model, hand, topology, state_sharding_, batch_sharding_):
  """Jitted `train_step(state, batch, rng) -> (state, metrics)`, as steps.make_train_step."""
  jitted = jit_train_step(config, model, topology, state_sharding_, batch_sharding_)
  hand = jax.device_put(hand, steps.replicated(batch_sharding_.mesh))
  return lambda state, batch, rng: jitted(state, batch, rng, hand)


def jit_train_step(config, model, topology, state_sharding_, batch_sharding_):
  """`make_train_step`'s step as `jitted(state, batch, rng, hand)` (for coarsemetro_jax/aot.py)."""
  repl = steps.replicated(batch_sharding_.mesh)

  def train_step(state, batch, rng, hand):
    rngs = steps.step_rngs(rng, state.step)
    gt_vertices, gt_joints = hand_losses.ground_truth_mesh(hand, batch)

    def loss_fn(params):
      params = steps.stop_frozen_gradients(params, config.optim)
      variables = {'params': params, 'batch_stats': state.batch_stats}
      outputs, new_stats = steps.apply_train(
          model, variables, batch['image'], rngs, config.bn_group_size
      )
      loss, terms = hand_losses.compute_loss(
          outputs, batch, gt_vertices, gt_joints, hand, topology, config.loss
      )
      return loss, (terms, new_stats)

    (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    out = {
        'loss': loss,
        'grad_norm': optax.tree.norm(grads),
        'lr': jnp.asarray(state.lr_fn(state.step), jnp.float32),
    }
    out.update({f'loss_{k}': v for k, v in terms.items()})
    return new_state, out

  return jax.jit(
      train_step,
      in_shardings=(state_sharding_, batch_sharding_, repl, repl),
      out_shardings=(state_sharding_, repl),
      donate_argnums=0,
  )


def predictions(outputs, hand=None):
  """The hand predictions eval and inference report (float32).

  With the hand model: pred_vertices [B, 778, 3] and pred_3d_joints [B, 21, 3]
  (the joints regressed from the mesh) minus that wrist, as the metrics centre
  them (`hand_losses.centre_predictions`). Without it: the raw mesh and the
  joint tokens. Also pred_cam [B, 3] and pred_2d_joints [B, 21, 2], the joints'
  weak-perspective projection in [-1, 1] crop units.
  """
  if hand is None:
    outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    vertices, joints3d = outputs['pred_3d_vertices_fine'], outputs['pred_3d_joints']
    cam = outputs['pred_cam']
  else:
    pred = hand_losses.centre_predictions(outputs, hand)
    vertices, joints3d, cam = pred['vertices_fine'], pred['mesh_joints'], pred['cam']
  return {
      'pred_cam': cam,
      'pred_vertices': vertices,
      'pred_3d_joints': joints3d,
      'pred_2d_joints': losses.orthographic_projection(joints3d, cam),
  }


def make_eval_step(config, model, hand, topology, state_sharding_, batch_sharding_, flip=None):
  """Jitted `eval_step(state, batch) -> (metrics.HandEvalMetrics, predictions)`.

  `flip` (default `config.eval_flip`): the flip test (`mirror.hand_flip_test`).
  Padded examples (`mask` 0) count nowhere; the predictions (batch-sharded,
  for pictures) are `predictions` with the hand model.
  """
  flip = config.eval_flip if flip is None else flip
  jitted = jit_eval_step(config, model, topology, state_sharding_, batch_sharding_, flip)
  hand = jax.device_put(hand, steps.replicated(batch_sharding_.mesh))
  return lambda state, batch: jitted(state, batch, hand)


def jit_eval_step(config, model, topology, state_sharding_, batch_sharding_, flip=False):
  """`make_eval_step`'s step as `jitted(state, batch, hand)` (see `jit_train_step`)."""
  del config  # the same signature as steps.jit_eval_step's
  repl = steps.replicated(batch_sharding_.mesh)

  def eval_step(state, batch, hand):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    apply = lambda images: model.apply(variables, images, train=False)
    outputs = mirror.hand_flip_test(apply, batch['image']) if flip else apply(batch['image'])
    pred = predictions(outputs, hand)
    gt = hand_losses.ground_truth(batch, *hand_losses.ground_truth_mesh(hand, batch), topology)
    errors = metrics.hand_errors_from_arrays(
        pred['pred_3d_joints'],
        gt['joints_3d'][..., :3],
        pred['pred_vertices'],
        gt['vertices_fine'],
        batch['has_3d_joints'],
        batch['has_smpl'],
        batch['mask'],
    )
    return metrics.hand_eval_metrics(errors), pred

  return jax.jit(
      eval_step,
      in_shardings=(state_sharding_, batch_sharding_, repl),
      out_shardings=(repl, batch_sharding_),
  )
