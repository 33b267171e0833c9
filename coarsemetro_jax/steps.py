"""TF-free training core: device mesh, sharded TrainState, jitted steps.

Layout: one device-mesh axis 'data' (AxisType.Auto);
the batch is sharded over it, the train state is replicated or, with
`config.param_sharding = 'fsdp'`, its large arrays (params and AdamW moments)
are sharded over 'data' too and XLA inserts the all-gathers / reduce-scatters.
State is born sharded: `jax.eval_shape(init)` -> shardings -> `jax.jit(init,
out_shardings=...)`. The steps are `jax.jit` with explicit in/out shardings;
the train step donates the state.

What is synchronised across devices:
* gradients, losses and metrics: everything is computed on the global batch
  (one program, GSPMD), so loss normalisations (e.g. N_has3d) are global;
* BatchNorm: with `config.bn_group_size = 0` the batch statistics are taken
  over the global batch (= SyncBatchNorm). With `bn_group_size = g > 0` the
  batch is split into groups of g examples (`jax.vmap` over groups; Flax
  BatchNorm without `axis_name` then reduces within a group only), which is
  PyTorch DDP without SyncBN at g images per GPU, FastMETRO's training
  (g = 16), independent of the device count. The running statistics are
  averaged over the groups (DDP kept rank 0's; the EMA is linear, so this is
  the EMA of the mean group statistics). If the batch is not larger than g
  there is one group.
* randomness: per step `fold_in(rng, step)` split into 'dropout' and
  'joint_mask' (and per BN group when grouped); `jax_threefry_partitionable`
  makes the draws independent of the sharding.

Mixed precision: `config.model.compute_dtype = 'bfloat16'` runs the model in
bf16 with float32 params and optimiser state; model outputs, losses and
metrics are float32.

SMPL-parameter head (`config.model.smpl_param_regressor`): the train loss is
`smpl_param_loss.total_loss` of L_smpl and the usual loss (`with_smpl_param_loss`),
and the eval also scores the mesh of the predicted parameters
(`smpl_param_errors`: 'smpl_mpjpe', 'smpl_pa_mpjpe', 'smpl_mpve').
"""

from collections.abc import Callable
import functools
from typing import Any

from clu import metrics as clu_metrics
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from coarsemetro_jax import body_model
from coarsemetro_jax import losses
from coarsemetro_jax import metrics
from coarsemetro_jax import mirror
from coarsemetro_jax import optimizer
from coarsemetro_jax import smpl_param_loss

DATA_AXIS = 'data'


def make_device_mesh(devices=None):
  """1-D device mesh ('data',) over `devices` (default: all), AxisType.Auto."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices
  )


def batch_sharding(device_mesh):
  """Leading (batch) axis over 'data'."""
  return NamedSharding(device_mesh, P(DATA_AXIS))


def replicated(device_mesh):
  return NamedSharding(device_mesh, P())


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and the lr schedule (static)."""

  batch_stats: Any = None
  lr_fn: Callable[[Any], Any] = flax.struct.field(pytree_node=False, default=None)


# ----------------------------------------------------------------------------
# Sharded state.


def fsdp_spec(shape, num_shards, min_size):
  """Shards the largest axis divisible by num_shards for arrays >= min_size."""
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  axes = [i for i, d in enumerate(shape) if d % num_shards == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: shape[i])
  return P(*[DATA_AXIS if i == axis else None for i in range(len(shape))])


def state_sharding(abstract_state, device_mesh, param_sharding='replicated', fsdp_min_size=2**18):
  """NamedShardings for every array of a (abstract) state."""
  if param_sharding not in ('replicated', 'fsdp'):
    raise ValueError(
        "config.param_sharding must be 'replicated' or 'fsdp', got " f'{param_sharding!r}'
    )
  n = device_mesh.shape[DATA_AXIS]

  def spec(x):
    if param_sharding == 'fsdp':
      return NamedSharding(device_mesh, fsdp_spec(x.shape, n, fsdp_min_size))
    return NamedSharding(device_mesh, P())

  return jax.tree.map(spec, abstract_state)


def with_camera_bias(params, cam_bias):
  """params with the camera head's bias set to `cam_bias` (s, tx, ty).

  `config.model.cam_bias_init`: a run from scratch starts at the data's
  typical camera, as a hand's (its weak-perspective scale is about 10, which
  Adam's lr-sized steps would take most of a short run to reach from 0).
  """
  cam = dict(params['cam_predictor'])
  cam['bias'] = jnp.asarray(cam_bias, cam['bias'].dtype).reshape(cam['bias'].shape)
  return {**params, 'cam_predictor': cam}


def create_train_state(config, model, rng, device_mesh, image_shape, steps_per_epoch=None):
  """Initialises params, batch_stats and AdamW state directly sharded.

  Args:
    config: full config (optim, param_sharding, fsdp_min_size).
    model: Flax module (`models.build_model`).
    rng: jax.random key for parameter initialisation.
    device_mesh: from `make_device_mesh`.
    image_shape: (S, S, 3) of one image.
    steps_per_epoch: needed for an lr step decay, and for a cosine decay over
      num_epochs.
  Returns:
    (state, state_sharding).
  """
  tx, lr_fn = optimizer.make_optimizer(
      config.optim, steps_per_epoch, optimizer.total_train_steps(config, steps_per_epoch)
  )

  def init(rng):
    variables = model.init({'params': rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    if config.model.get('cam_bias_init'):
      params = with_camera_bias(params, config.model.cam_bias_init)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables.get('batch_stats', {}),
        lr_fn=lr_fn,
    )

  abstract = jax.eval_shape(init, rng)
  sharding = state_sharding(abstract, device_mesh, config.param_sharding, config.fsdp_min_size)
  state = jax.jit(init, out_shardings=sharding)(rng)
  return state, sharding


# ----------------------------------------------------------------------------
# Steps.


def apply_train(model, variables, images, rngs, bn_group_size=0):
  """Training forward pass with BatchNorm statistics per group of examples.

  Args:
    model, variables: Flax module and {'params', 'batch_stats'}.
    images: [B, S, S, 3].
    rngs: {'dropout': key, 'joint_mask': key}.
    bn_group_size: examples per BatchNorm group; 0 (or >= B) = whole batch.
  Returns:
    (outputs, new batch_stats); with groups, the stats are the group mean.
  """
  b = images.shape[0]
  if not bn_group_size or b <= bn_group_size:
    outputs, state = model.apply(variables, images, train=True, rngs=rngs, mutable=['batch_stats'])
    return outputs, state.get('batch_stats', {})
  if b % bn_group_size:
    raise ValueError(
        f'batch size {b} is not a multiple of config.bn_group_size ' f'{bn_group_size}'
    )
  groups = b // bn_group_size
  images = images.reshape(groups, bn_group_size, *images.shape[1:])
  rngs = {k: jax.random.split(v, groups) for k, v in rngs.items()}

  def one_group(x, group_rngs):
    return model.apply(variables, x, train=True, rngs=group_rngs, mutable=['batch_stats'])

  outputs, state = jax.vmap(one_group)(images, rngs)
  outputs = jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), outputs)
  stats = jax.tree.map(lambda x: x.mean(0), state.get('batch_stats', {}))
  return outputs, stats


def step_rngs(rng, step):
  """Per-step keys: fold_in(rng, step) split into 'dropout' and 'joint_mask'."""
  dropout, joint_mask = jax.random.split(jax.random.fold_in(rng, step))
  return {'dropout': dropout, 'joint_mask': joint_mask}


def _ground_truth_mesh(body, batch):
  vertices, _ = body_model.forward(body, batch['pose'], batch['betas'])
  return vertices  # [B, 6890, 3]


def make_train_step(config, model, body, topology, state_sharding_, batch_sharding_):
  """Jitted `train_step(state, batch, rng) -> (state, metrics)`.

  The state is donated; metrics (loss, unweighted loss terms as 'loss_<name>',
  grad_norm, lr) come back replicated. `rng` is the run's base key; the
  per-step keys are folded from it with `state.step`. GT meshes come from the
  body model inside the step.
  """
  jitted = jit_train_step(config, model, topology, state_sharding_, batch_sharding_)
  body = jax.device_put(body, replicated(batch_sharding_.mesh))
  return lambda state, batch, rng: jitted(state, batch, rng, body)


def gradient_step(config, model, state, images, rng, loss_of_outputs):
  """One optimiser step on `images` [B, S, S, 3]: the body's and the hand's train steps.

  The forward pass runs in train mode (per-step dropout keys from `rng`,
  BatchNorm groups), `loss_of_outputs(outputs) -> (loss, {term: value})`
  scores it, and AdamW applies the gradient (frozen groups stopped).
  Returns (new_state, {'loss', 'grad_norm', 'lr', 'loss_<term>', ...}).
  """
  rngs = step_rngs(rng, state.step)

  def loss_fn(params):
    params = optimizer.stop_frozen_gradients(params, config.optim)
    variables = {'params': params, 'batch_stats': state.batch_stats}
    outputs, new_stats = apply_train(model, variables, images, rngs, config.bn_group_size)
    loss, terms = loss_of_outputs(outputs)
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


def jit_train_step(config, model, topology, state_sharding_, batch_sharding_):
  """`make_train_step`'s step as `jitted(state, batch, rng, body)`.

  Takes the body model as an argument, so it can be lowered for abstract
  inputs on devices that hold no data (coarsemetro_jax/aot.py).
  """
  repl = replicated(batch_sharding_.mesh)

  def train_step(state, batch, rng, body):
    regress = functools.partial(body_model.h36m_joints, body)
    gt_vertices = _ground_truth_mesh(body, batch)

    def loss_of_outputs(outputs):
      loss, terms = losses.compute_loss(outputs, batch, gt_vertices, regress, topology, config.loss)
      if config.model.smpl_param_regressor:
        loss, terms = with_smpl_param_loss(
            loss, terms, outputs, batch, gt_vertices, regress, topology, body, config.loss
        )
      return loss, terms

    return gradient_step(config, model, state, batch['image'], rng, loss_of_outputs)

  return jax.jit(
      train_step,
      in_shardings=(state_sharding_, batch_sharding_, repl, repl),
      out_shardings=(state_sharding_, repl),
      donate_argnums=0,
  )


def with_smpl_param_loss(
    usual, terms, outputs, batch, gt_vertices, regress_h36m, topology, body, loss_config
):
  """(`smpl_param x L_smpl + smpl_param_usual x usual`, terms).

  The terms are the usual loss's, plus 'usual' (its total), 'smpl' (L_smpl)
  and L_smpl's own terms ('smpl_params', 'smpl_joints_3d', ...).
  """
  smpl_total, smpl_terms = smpl_param_loss.smpl_loss(
      outputs,
      batch,
      gt_vertices,
      regress_h36m,
      topology,
      body,
      use_has_2d_joints=loss_config.use_has_2d_joints,
  )
  total = smpl_param_loss.total_loss(
      smpl_total, usual, loss_config.smpl_param, loss_config.smpl_param_usual
  )
  return total, {**terms, 'usual': usual, 'smpl': smpl_total, **smpl_terms}


def predictions(outputs, regress_h36m=None):
  """The predictions eval and inference report, from model outputs.

  With `regress_h36m` (vertices [B, V, 3] -> H36M joints [B, 17, 3]) the mesh
  and its joints are centred as the metrics centre them
  (`losses.centre_predictions`): pred_vertices [B, V, 3] and pred_3d_joints
  [B, 14, 3] (the J14 regressed from the mesh) minus the mesh's H36M pelvis.
  Without it (no body model), the raw mesh and the joint tokens. Also pred_cam
  [B, 3] and pred_2d_joints [B, 14, 2], the joints' weak-perspective
  projection in [-1, 1] crop units. All float32. A model with the
  SMPL-parameter head also passes pred_rotmat [B, 24, 3, 3] and pred_betas
  [B, 10] through.
  """
  if regress_h36m is None:
    outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
    vertices, joints3d = outputs['pred_3d_vertices_fine'], outputs['pred_3d_joints']
    cam = outputs['pred_cam']
  else:
    pred = losses.centre_predictions(outputs, regress_h36m)
    vertices, joints3d, cam = pred['vertices_fine'], pred['mesh_joints'], pred['cam']
  head = {
      k: jnp.asarray(outputs[k], jnp.float32) for k in ('pred_rotmat', 'pred_betas') if k in outputs
  }
  return {
      'pred_cam': cam,
      'pred_vertices': vertices,
      'pred_3d_joints': joints3d,
      'pred_2d_joints': losses.orthographic_projection(joints3d, cam),
      **head,
  }


def _smpl_average(name, mask):
  return metrics.MaskedAverage.from_fun(
      lambda **out: {'values': out[f'smpl_{name}'], 'mask': out[mask]}
  )


# metrics.EvalMetrics plus the same metrics of the SMPL-parameter head's mesh.
SMPLEvalMetrics = clu_metrics.Collection.create(
    **metrics.EvalMetrics.__annotations__,
    smpl_mpjpe=_smpl_average('mpjpe', 'joints_mask'),
    smpl_pa_mpjpe=_smpl_average('pa_mpjpe', 'joints_mask'),
    smpl_mpve=_smpl_average('mpve', 'vertices_mask'),
)


def smpl_param_errors(body, regress_h36m, outputs, gt, batch):
  """Per-example errors of the mesh of pred_rotmat/pred_betas, keys 'smpl_<metric>'.

  As FastMETRO scores its parametric results: the body model's mesh of the
  predicted parameters, centred at its regressed H36M pelvis
  (`smpl_param_loss.smpl_mesh_predictions`), against the same ground truth
  and masks as the non-parametric mesh (`metrics.errors_from_arrays`).
  """
  pred = smpl_param_loss.smpl_mesh_predictions(
      body, regress_h36m, outputs['pred_rotmat'], outputs['pred_betas']
  )
  errors = metrics.errors_from_arrays(
      pred['mesh_joints'],
      gt['joints_3d'][..., :3],
      pred['vertices_fine'],
      gt['vertices_fine'],
      batch['has_3d_joints'],
      batch['has_smpl'],
      batch['mask'],
  )
  return {f'smpl_{k}': v for k, v in errors.items() if not k.endswith('_mask')}


def make_eval_step(config, model, body, topology, state_sharding_, batch_sharding_, flip=None):
  """Jitted `eval_step(state, batch) -> (metrics.EvalMetrics, predictions)`.

  `flip` (default `config.eval_flip`): average with the mirrored image's
  prediction (mirror.py).

  The collection (replicated) is merged over batches by the caller; padded
  examples (`mask` 0) count nowhere. The predictions (batch-sharded, for
  pictures) are `predictions` with the body model's H36M regressor; the
  metrics are computed on them. With the SMPL-parameter head the collection
  is `SMPLEvalMetrics` (`smpl_param_errors`; with `flip`, of the plain image's
  parameters: rotations and betas are not averaged).
  """
  flip = config.eval_flip if flip is None else flip
  flip_perm = mirror.mirror_permutation(body.v_template) if flip else None
  jitted = jit_eval_step(config, model, topology, state_sharding_, batch_sharding_, flip_perm)
  body = jax.device_put(body, replicated(batch_sharding_.mesh))
  return lambda state, batch: jitted(state, batch, body)


def jit_eval_step(config, model, topology, state_sharding_, batch_sharding_, flip_perm=None):
  """`make_eval_step`'s step as `jitted(state, batch, body)` (see `jit_train_step`).

  `flip_perm`: the body's mirror permutation for the flip test, None for none.
  """
  repl = replicated(batch_sharding_.mesh)

  def eval_step(state, batch, body):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    apply = lambda images: model.apply(variables, images, train=False)
    if flip_perm is None:
      outputs = apply(batch['image'])
    else:
      outputs = mirror.flip_averaged_outputs(apply, batch['image'], flip_perm)
    regress = functools.partial(body_model.h36m_joints, body)
    pred = predictions(outputs, regress)
    gt = losses.ground_truth(batch, _ground_truth_mesh(body, batch), regress, topology)
    errors = metrics.errors_from_arrays(
        pred['pred_3d_joints'],
        gt['joints_3d'][..., :3],
        pred['pred_vertices'],
        gt['vertices_fine'],
        batch['has_3d_joints'],
        batch['has_smpl'],
        batch['mask'],
    )
    if config.model.smpl_param_regressor:
      errors.update(smpl_param_errors(body, regress, outputs, gt, batch))
      return SMPLEvalMetrics.single_from_model_output(**errors), pred
    return metrics.eval_metrics(errors), pred

  return jax.jit(
      eval_step,
      in_shardings=(state_sharding_, batch_sharding_, repl),
      out_shardings=(repl, batch_sharding_),
  )
