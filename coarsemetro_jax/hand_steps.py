"""Jitted train and eval steps of the hand networks (config.model.hand).

The body's steps (steps.py: sharding, BatchNorm groups, rng, frozen groups,
donation) with the hand model in place of the body model: the GT mesh is
`hand_losses.ground_truth_mesh` inside the step, the loss
`hand_losses.compute_loss`, and the eval collection `metrics.HandEvalMetrics`
(PA-MPJPE, PA-MPVPE, F@5 mm, F@15 mm). With `config.eval_flip` the eval
averages with the mirrored image's prediction (`mirror.hand_flip_test`).

With `config.mirror_left_hands` the network sees right hands only: a left-hand
row (its side known, as a hand detector gives it and as the mean-pose
baseline is told it) is mirrored into a right hand first (`to_right_hands`:
image, 2D and 3D joints in x, pose by `hand_model.mirror_pose`), and in the
eval its prediction is mirrored back before the metrics and pictures
(PA-aligned metrics are the same either way). FreiHAND has right hands only,
where this changes nothing; on data with both sides the network then never has
to tell them apart from the image.

Hand batches are the body's dict with joints_2d [B, 21, 3], joints_3d
[B, 21, 4], pose [B, 48] (MANO), betas [B, 10] and, optionally,
`hand_losses.LEFT_KEY` [B] (1 = left hand).
"""

import jax
import jax.numpy as jnp

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
    hand_losses.LEFT_KEY: (),
}


def to_right_hands(batch):
  """(batch with its left rows mirrored into right hands, left [B] bool or None).

  A left row's mirror image is the right hand of the mirrored pose: its image
  flips left-right (normalised crop x -> -x), its joints flip in x, its pose
  becomes `hand_model.mirror_pose` of its own, and its side flag is cleared.
  """
  flag = batch.get(hand_losses.LEFT_KEY)
  if flag is None:
    return batch, None
  left = jnp.asarray(flag) > 0  # [B]
  pick = lambda x, mirrored: jnp.where(left.reshape((-1,) + (1,) * (x.ndim - 1)), mirrored, x)
  flip_x = lambda x: jnp.asarray(x).at[..., 0].multiply(-1.0)
  return {
      **batch,
      'image': pick(batch['image'], jnp.asarray(batch['image'])[:, :, ::-1]),
      'joints_2d': pick(batch['joints_2d'], flip_x(batch['joints_2d'])),
      'joints_3d': pick(batch['joints_3d'], flip_x(batch['joints_3d'])),
      'pose': pick(batch['pose'], hand_model_lib.mirror_pose(batch['pose'])),
      hand_losses.LEFT_KEY: jnp.zeros_like(flag),
  }, left


def _mirror_back(outputs, left):
  """Outputs of mirrored left rows mapped back to their own images (`mirror.unflip_outputs`)."""
  back = mirror.unflip_outputs(outputs, None, None)
  back['pred_3d_vertices_coarse'] = outputs['pred_3d_vertices_coarse'].at[..., 0].multiply(-1.0)
  pick = lambda x, m: jnp.where(left.reshape((-1,) + (1,) * (x.ndim - 1)), m, x)
  return {**outputs, **{k: pick(outputs[k], v) for k, v in back.items()}}


def make_train_step(config, model, hand, topology, state_sharding_, batch_sharding_):
  """Jitted `train_step(state, batch, rng) -> (state, metrics)`, as steps.make_train_step."""
  jitted = jit_train_step(config, model, topology, state_sharding_, batch_sharding_)
  hand = jax.device_put(hand, steps.replicated(batch_sharding_.mesh))
  return lambda state, batch, rng: jitted(state, batch, rng, hand)


def jit_train_step(config, model, topology, state_sharding_, batch_sharding_):
  """`make_train_step`'s step as `jitted(state, batch, rng, hand)` (for coarsemetro_jax/aot.py)."""
  repl = steps.replicated(batch_sharding_.mesh)

  def train_step(state, batch, rng, hand):
    if config.get('mirror_left_hands', False):
      batch, _ = to_right_hands(batch)
    gt_vertices, gt_joints = hand_losses.ground_truth_mesh(hand, batch)

    def loss_of_outputs(outputs):
      return hand_losses.compute_loss(
          outputs, batch, gt_vertices, gt_joints, hand, topology, config.loss
      )

    return steps.gradient_step(config, model, state, batch['image'], rng, loss_of_outputs)

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
  mirror_left = config.get('mirror_left_hands', False)
  repl = steps.replicated(batch_sharding_.mesh)

  def eval_step(state, batch, hand):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    apply = lambda images: model.apply(variables, images, train=False)
    seen, left = to_right_hands(batch) if mirror_left else (batch, None)
    outputs = mirror.hand_flip_test(apply, seen['image']) if flip else apply(seen['image'])
    if left is not None:
      outputs = _mirror_back(outputs, left)
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
