r"""How much of the embedded hand recipe's error comes from locating the 2D joints.

  python -m benchmarks.hand_2d [--parts=lifting,localisation] [--noise_px=0,1,2,4]
      [--steps=2400] [--num_train=10000] [--num_test=500]
  python -m benchmarks.hand_2d --parts=model --checkpoint=runs/hand_embedded

Measurements on configs/hand_embedded.py's synthetic hands (rendered first if
they are not cached), left hands mirrored into right ones as the recipe does.
Each 2D result also gets a "true depth" figure: the PA-MPJPE of its 2D joints
made 3D with the ground truth's depth (`with_true_depth`), no learned lifting,
so what the 2D error alone costs in 3D.

  * lifting: an MLP (2 hidden layers of 512) from the ground-truth 2D joints
    (wrist-relative, scaled to unit size) to the wrist-relative 3D joints,
    trained on the training split and scored by PA-MPJPE on the test split,
    with Gaussian noise of standard deviation --noise_px pixels per coordinate
    (at the stored image size) on the 2D joints of both splits. It prints the
    noise's mean length in crop pixels, the localisation part's measure, and
    shows what 3D accuracy a given 2D accuracy allows, next to the mean hand's
    PA-MPJPE.
  * localisation: the recipe's backbone (`config.model.resnet_depths` and
    `resnet_width`), from random weights, with a linear layer on its flattened
    feature map regressing the 21 2D joints of the recipe's crops (L1 in
    [-1, 1] crop units, as the recipe's 2D loss; Adam at the lr the recipe
    gives its backbone, lr x backbone_lr_mult, with warm-up and cosine decay,
    batch 32, no augmentation). It prints the mean pixel error on the test
    split and on 500 training crops at each quarter of --steps, next to the
    mean-2D-joints baseline.
  * model: a trained hand model of the recipe's config (--checkpoint: a
    workdir, a step or a converted checkpoint) on the test split: the mean
    pixel error of its joints' weak-perspective projection (the 2D the loss
    trains), the PA-MPJPE of its 3D joints, and that of its 2D with the true
    depth. Where the two PA-MPJPEs are close, the model's 3D error is its 2D
    error, not its depth.

It prints one markdown table per part. Nothing here is timed.
"""

import collections
import os
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coarsemetro_jax import build
from coarsemetro_jax import checkpoints
from coarsemetro_jax import hand_steps
from coarsemetro_jax import infer
from coarsemetro_jax import metrics
from coarsemetro_jax.models import resnet
from configs import hand_embedded
from data_pipelines import augment
from data_pipelines import datasets
from data_pipelines import metro_crop
from data_pipelines import metro_tsv

_PARTS = flags.DEFINE_list('parts', ['lifting', 'localisation'], 'lifting, localisation, model')
_NOISE = flags.DEFINE_list('noise_px', ['0', '1', '2', '4'], '2D noise (px, stored images)')
_LIFT_STEPS = flags.DEFINE_integer('lifting_steps', 10_000, 'MLP steps (batch 128)')
_STEPS = flags.DEFINE_integer('steps', 2400, 'localisation steps (batch 32)')
_NUM_TRAIN = flags.DEFINE_integer('num_train', None, "training images (None: the recipe's)")
_NUM_TEST = flags.DEFINE_integer('num_test', None, "test images (None: the recipe's)")
_DIR = flags.DEFINE_string('synthetic_dir', None, "where the hands are (None: the recipe's)")
_SEED = flags.DEFINE_integer('seed', 0, 'initialisation and batch order')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "the model part's trained hand model")
_SCORED = 500  # training crops scored for the localisation's training error


def normalised_2d(joints_2d):
  """Wrist-relative 2D joints scaled so that the farthest joint is 1. [..., 21, 2] -> same."""
  rel = joints_2d - joints_2d[..., :1, :]
  return rel / np.linalg.norm(rel, axis=-1).max(-1)[..., None, None]


def load_split(yaml_path, crop_size):
  """One split of a hand dataset, cropped as the recipe crops it, left hands mirrored.

  Returns:
    crops [N, R, R, 3] float32 ImageNet-normalised (R = crop_size; the
    recipe's 'continuous' crop of the label's box), joints_2d [N, 21, 2] in
    [-1, 1] crop units, joints_px [N, 21, 2] in the stored image's pixels,
    joints_3d [N, 21, 3] wrist-relative metres, and crop_px [N], crop pixels
    per image pixel. A left hand's crop, 2D and 3D joints are mirrored (x
    negated about the crop's centre, the image's and the wrist).
  """
  dataset = metro_tsv.MetroDataset(yaml_path, hand=True)
  crops, joints_2d, joints_px, joints_3d, crop_px = [], [], [], [], []
  for i in range(len(dataset)):
    example = dataset.read(i)
    label = example['label']
    image = metro_crop.decode_image(example['jpeg'])
    out = augment.process_example(image, label, augment.AugParams(), crop_size, hand=True)
    crop = out['image']
    uv = out['joints_2d'][:, :2]
    px = np.array(label['joints_2d'][:, :2], np.float64)
    xyz = out['joints_3d'][:, :3]
    if label['is_left']:
      crop = crop[:, ::-1]
      uv = uv * np.array([-1.0, 1.0])
      px[:, 0] = image.shape[1] - 1 - px[:, 0]  # pixel centres at integers
      xyz = xyz * np.array([-1.0, 1.0, 1.0])
    crops.append(metro_crop.normalize(crop.astype(np.float32) / 255.0))
    joints_2d.append(uv)
    joints_px.append(px)
    joints_3d.append(xyz)
    crop_px.append(crop_size / (200.0 * float(label['scale'])))
  return (
      np.stack(crops).astype(np.float32),
      np.stack(joints_2d).astype(np.float32),
      np.stack(joints_px),
      np.stack(joints_3d).astype(np.float32),
      np.asarray(crop_px),
  )


def pa_mpjpe_mm(pred, gt):
  """Mean PA-MPJPE in mm of [N, 21, 3] predictions."""
  return 1000.0 * float(jnp.mean(metrics.pa_mpjpe(jnp.asarray(pred), jnp.asarray(gt))))


def crop_px_error(pred, gt, crop_size):
  """Mean 2D joint distance in crop pixels of [N, 21, 2] joints in [-1, 1] crop units."""
  return float(np.linalg.norm((pred - gt) * crop_size / 2.0, axis=-1).mean())


def camera_fit(uv, xyz):
  """Each example's weak-perspective camera, fitted to its true joints: uv ~ s * xy + c.

  Least squares over the 21 joints (the renders' camera is near-orthographic,
  so the fit is exact to a fraction of a pixel). uv [N, 21, 2] in any 2D unit,
  xyz [N, 21, 3] -> s [N], c [N, 2] in that unit.
  """
  n, j, _ = uv.shape
  design = np.concatenate(
      [np.asarray(xyz, np.float64)[..., :2].reshape(n, 2 * j, 1), np.tile(np.eye(2), (n, j, 1))],
      -1,
  )  # [N, 2J, 3]: columns s, c_x, c_y
  target = np.asarray(uv, np.float64).reshape(n, 2 * j)
  coef = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(design, target)])
  return coef[:, 0], coef[:, 1:]


def with_true_depth(pred_uv, uv, xyz):
  """Predicted 2D joints made 3D with the true depth: no learned lifting. -> [N, 21, 3].

  x and y are pred_uv taken back through the camera that maps the true 3D
  joints onto the true 2D joints (`camera_fit`); z is the true z. Its
  PA-MPJPE is what the 2D error alone costs in 3D.
  """
  s, c = camera_fit(uv, xyz)
  xy = (np.asarray(pred_uv, np.float64) - c[:, None]) / s[:, None, None]
  return np.concatenate([xy, np.asarray(xyz, np.float64)[..., 2:]], -1)


class LiftingMLP(nn.Module):
  """[B, 42] normalised 2D joints -> [B, 21, 3] wrist-relative joints in decimetres."""

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(63)(x).reshape(-1, 21, 3)


def fit(loss_fn, params, batches, lr, steps, extra=None):
  """Adam with warm-up and cosine decay over `steps` batches of `batches(i)`."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, extra, opt_state, batch):
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), extra, opt_state, loss

  for i in range(steps):
    params, extra, opt_state, _ = step(params, extra, opt_state, batches(i))
    yield i + 1, params, extra


def lifting_rows(train, test, noise_px, steps, seed):
  """[(2D input, its mean error in crop px, PA-MPJPE mm, with the true depth)]: MLP and mean hand."""
  rng = np.random.default_rng(seed)
  # procrustes_mean centres its mean at the body's hips (two hand joints
  # here); PA-MPJPE aligns translation away, so the baseline does not see it.
  mean_hand = metrics.procrustes_mean(train[3])
  mean_mm = pa_mpjpe_mm(np.broadcast_to(mean_hand, test[3].shape), test[3])
  rows = [('mean hand (no 2D)', None, mean_mm, None)]
  model = LiftingMLP()
  to_crop = test[4][:, None]
  y_train = 10.0 * train[3]  # decimetres: outputs near unit size

  def loss_fn(params, extra, batch):
    x, y = batch
    return jnp.abs(model.apply(params, x) - y).mean(), extra

  for noise in noise_px:
    noises = [rng.normal(0.0, noise, s[2].shape) for s in (train, test)]
    noisy = [normalised_2d(s[2] + n).reshape(len(s[2]), -1) for s, n in zip((train, test), noises)]
    x_train, x_test = (n.astype(np.float32) for n in noisy)
    params = model.init(jax.random.key(seed), x_train[:1])

    def batches(i):
      idx = rng.integers(0, len(x_train), 128)
      return x_train[idx], y_train[idx]

    ((_, params, _),) = collections.deque(fit(loss_fn, params, batches, 1e-3, steps), maxlen=1)
    pred = np.asarray(model.apply(params, x_test)) / 10.0
    crop_err = float((np.linalg.norm(noises[1], axis=-1) * to_crop).mean())
    true_depth = pa_mpjpe_mm(with_true_depth(test[2] + noises[1], test[2], test[3]), test[3])
    rows.append((f'sigma {noise:g} px', crop_err, pa_mpjpe_mm(pred, test[3]), true_depth))
  return rows


class Localiser(nn.Module):
  """The recipe's ResNet and a linear layer: [B, R, R, 3] -> [B, 21, 2] in [-1, 1]."""

  depths: tuple[int, ...]
  width: int

  @nn.compact
  def __call__(self, images, train=False):
    features = resnet.ResNet(depths=self.depths, width=self.width)(images, train)  # [B, h, w, C]
    b = features.shape[0]
    return nn.Dense(42)(features.reshape(b, -1)).reshape(b, 21, 2)


def localisation_rows(config, train, test, steps, seed):
  """[(step, test px, train px, test PA-MPJPE mm with the true depth)], mean 2D joints first."""
  err = lambda pred, gt: crop_px_error(pred, gt, config.data.image_size)
  true_depth = lambda pred: pa_mpjpe_mm(with_true_depth(pred, test[1], test[3]), test[3])
  mean_2d = np.broadcast_to(train[1].mean(0, keepdims=True), test[1].shape)
  rows = [('mean 2D joints', err(mean_2d, test[1]), None, true_depth(mean_2d))]
  model = Localiser(tuple(config.model.resnet_depths), config.model.resnet_width)
  variables = model.init(jax.random.key(seed), train[0][:2])
  rng = np.random.default_rng(seed)

  def loss_fn(params, batch_stats, batch):
    images, uv = batch
    pred, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, True, mutable=['batch_stats']
    )
    return jnp.abs(pred - uv).mean(), updates['batch_stats']

  def batches(i):
    idx = rng.integers(0, len(train[0]), config.data.batch_size)
    return train[0][idx], train[1][idx]

  predict = jax.jit(lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, x))

  def predict_all(params, batch_stats, split, num):
    pred = [predict(params, batch_stats, split[0][k : k + 100]) for k in range(0, num, 100)]
    return np.concatenate(pred)

  scored = min(_SCORED, len(train[0]))
  checkpoints = {max(1, steps * q // 4) for q in range(1, 5)}
  lr = config.optim.lr * config.optim.backbone_lr_mult  # the recipe's backbone trains at this
  run = fit(loss_fn, variables['params'], batches, lr, steps, variables['batch_stats'])
  for step, params, batch_stats in run:
    if step in checkpoints:
      on_test = predict_all(params, batch_stats, test, len(test[0]))
      on_train = predict_all(params, batch_stats, train, scored)
      rows.append(
          (
              f'step {step}',
              err(on_test, test[1]),
              err(on_train, train[1][:scored]),
              true_depth(on_test),
          )
      )
  return rows


def model_predictions(config, checkpoint, images):
  """A trained hand model's joints on `images` [N, R, R, 3] (ImageNet-normalised right hands).

  Returns uv [N, 21, 2], the weak-perspective projection of its wrist-centred
  3D joints in [-1, 1] crop units (as its 2D loss sees them), and xyz
  [N, 21, 3], those 3D joints (regressed from its 778-vertex mesh, as the
  recipe's metrics take them).
  """
  built = build.build(config)  # with the hand model, for the mesh's joint regressor
  variables = infer.load_variables(config, built.model, checkpoint)

  @jax.jit
  def run(x):
    outputs = built.model.apply(variables, x, train=False)
    pred = hand_steps.predictions(outputs, built.body)
    return pred['pred_2d_joints'], pred['pred_3d_joints']

  out = [run(images[k : k + 100]) for k in range(0, len(images), 100)]
  return tuple(np.concatenate([np.asarray(o[i]) for o in out]) for i in range(2))


def model_row(config, pred_uv, pred_xyz, test):
  """(2D error in crop px, PA-MPJPE mm, PA-MPJPE mm of its 2D with the true depth) on `test`."""
  px = crop_px_error(pred_uv, test[1], config.data.image_size)
  true_depth = pa_mpjpe_mm(with_true_depth(pred_uv, test[1], test[3]), test[3])
  return px, pa_mpjpe_mm(pred_xyz, test[3]), true_depth


def print_table(header, rows, specs):
  """A markdown table and a blank line: a cell of None prints as '-', others by `specs`."""
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for row in rows:
    cells = ('-' if v is None else format(v, spec) for v, spec in zip(row, specs))
    print('| ' + ' | '.join(cells) + ' |')
  print()


def main(argv):
  del argv
  config = hand_embedded.get_config()
  synthetic = config.data.synthetic
  for name, value in (('num_train', _NUM_TRAIN), ('num_test', _NUM_TEST), ('dir', _DIR)):
    if value.value is not None:
      synthetic[name] = value.value
  parts = set(_PARTS.value)
  unknown = parts - {'lifting', 'localisation', 'model'}
  if unknown:
    raise app.UsageError(f'--parts: unknown {sorted(unknown)}; use lifting, localisation, model')
  if 'model' in parts and not _CHECKPOINT.value:
    raise app.UsageError('--parts=model needs --checkpoint (a workdir, a step or a converted one)')
  try:
    root = datasets.prepare_synthetic(config.data)
  except datasets.InputError as e:  # another dataset in the way: one line, nothing removed
    raise SystemExit(f'benchmarks.hand_2d: {e}') from None
  start = time.time()
  splits = ('train', 'test') if parts - {'model'} else ('test',)
  loaded = {s: load_split(os.path.join(root, f'{s}.yaml'), config.data.image_size) for s in splits}
  train, test = loaded.get('train'), loaded['test']
  print(
      f'{len(train[0]) if train else 0} train / {len(test[0])} test hands from {root}, '
      f'{config.data.image_size}-px crops of {synthetic.image_size}-px images '
      f'(loaded in {time.time() - start:.0f} s)\n'
  )
  crop = f'{config.data.image_size}-px crop px'
  if 'lifting' in parts:
    noise = [float(n) for n in _NOISE.value]
    print(f'Lifting: MLP from 2D joints with noise to 3D joints, {_LIFT_STEPS.value} steps\n')
    print_table(
        (
            f'2D input (Gaussian noise per coordinate, {synthetic.image_size}-px image)',
            f'its mean error ({crop})',
            'held-out PA-MPJPE (mm)',
            'with the true depth instead (mm)',
        ),
        lifting_rows(train, test, noise, _LIFT_STEPS.value, _SEED.value),
        ('s', '.2f', '.1f', '.1f'),
    )
  if 'localisation' in parts:
    print(
        f'Localisation: ResNet depths {tuple(config.model.resnet_depths)}, width '
        f'{config.model.resnet_width}, linear head, {_STEPS.value} steps\n'
    )
    print_table(
        (
            '2D joints',
            f'held-out error ({crop})',
            'training error',
            'held-out PA-MPJPE with the true depth (mm)',
        ),
        localisation_rows(config, train, test, _STEPS.value, _SEED.value),
        ('s', '.2f', '.2f', '.1f'),
    )
  if 'model' in parts:
    try:
      pred_uv, pred_xyz = model_predictions(config, _CHECKPOINT.value, test[0])
    except checkpoints.CheckpointError as e:  # not a model of this recipe: one line
      raise SystemExit(f'benchmarks.hand_2d: {e}') from None
    print(f'Model: {_CHECKPOINT.value}\n')
    print_table(
        (
            f'2D error of its joints ({crop})',
            'its PA-MPJPE (mm)',
            'PA-MPJPE of its 2D with the true depth (mm)',
        ),
        [model_row(config, pred_uv, pred_xyz, test)],
        ('.2f', '.1f', '.1f'),
    )


if __name__ == '__main__':
  app.run(main)
