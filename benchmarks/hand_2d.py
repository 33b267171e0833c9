r"""How much of the embedded hand recipe's error comes from locating the 2D joints.

  python -m benchmarks.hand_2d [--parts=lifting,localisation] [--noise_px=0,1,2,4]
      [--steps=2400] [--num_train=10000] [--num_test=500]

Two measurements on configs/hand_embedded.py's synthetic hands (rendered first
if they are not cached), left hands mirrored into right ones as the recipe
does:

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
    [-1, 1] crop units, as the recipe's 2D loss; Adam, the recipe's lr with
    warm-up and cosine decay, batch 32, no augmentation). It prints the mean
    pixel error on the test split and on 500 training crops at each quarter of
    --steps, next to the mean-2D-joints baseline.

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

from coarsemetro_jax import metrics
from coarsemetro_jax.models import resnet
from configs import hand_embedded
from data_pipelines import augment
from data_pipelines import datasets
from data_pipelines import metro_crop
from data_pipelines import metro_tsv

_PARTS = flags.DEFINE_list('parts', ['lifting', 'localisation'], 'lifting and/or localisation')
_NOISE = flags.DEFINE_list('noise_px', ['0', '1', '2', '4'], '2D noise (px, stored images)')
_LIFT_STEPS = flags.DEFINE_integer('lifting_steps', 10_000, 'MLP steps (batch 128)')
_STEPS = flags.DEFINE_integer('steps', 2400, 'localisation steps (batch 32)')
_NUM_TRAIN = flags.DEFINE_integer('num_train', None, "training images (None: the recipe's)")
_NUM_TEST = flags.DEFINE_integer('num_test', None, "test images (None: the recipe's)")
_DIR = flags.DEFINE_string('synthetic_dir', None, "where the hands are (None: the recipe's)")
_SEED = flags.DEFINE_integer('seed', 0, 'initialisation and batch order')
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
  """[(2D input, its mean error in crop px, PA-MPJPE mm)]: the lifting MLP and the mean hand."""
  rng = np.random.default_rng(seed)
  # procrustes_mean centres its mean at the body's hips (two hand joints
  # here); PA-MPJPE aligns translation away, so the baseline does not see it.
  mean_hand = metrics.procrustes_mean(train[3])
  mean_mm = pa_mpjpe_mm(np.broadcast_to(mean_hand, test[3].shape), test[3])
  rows = [('mean hand (no 2D)', None, mean_mm)]
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
    rows.append((f'sigma {noise:g} px', crop_err, pa_mpjpe_mm(pred, test[3])))
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
  """[(step, test px, train px)] of the 2D regressor, and the mean-2D-joints baseline."""
  size = config.data.image_size
  to_px = lambda uv: uv * size / 2.0
  err = lambda pred, gt: float(np.linalg.norm(to_px(pred - gt), axis=-1).mean())
  rows = [('mean 2D joints', err(train[1].mean(0, keepdims=True), test[1]), None)]
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

  def score(params, batch_stats, split, num):
    pred = [predict(params, batch_stats, split[0][k : k + 100]) for k in range(0, num, 100)]
    return err(np.concatenate(pred), split[1][:num])

  scored = min(_SCORED, len(train[0]))
  checkpoints = {max(1, steps * q // 4) for q in range(1, 5)}
  run = fit(loss_fn, variables['params'], batches, config.optim.lr, steps, variables['batch_stats'])
  for step, params, batch_stats in run:
    if step in checkpoints:
      rows.append(
          (
              f'step {step}',
              score(params, batch_stats, test, len(test[0])),
              score(params, batch_stats, train, scored),
          )
      )
  return rows


def main(argv):
  del argv
  config = hand_embedded.get_config()
  synthetic = config.data.synthetic
  for name, value in (('num_train', _NUM_TRAIN), ('num_test', _NUM_TEST), ('dir', _DIR)):
    if value.value is not None:
      synthetic[name] = value.value
  unknown = set(_PARTS.value) - {'lifting', 'localisation'}
  if unknown:
    raise app.UsageError(f'--parts: unknown {sorted(unknown)}; use lifting and/or localisation')
  try:
    root = datasets.prepare_synthetic(config.data)
  except datasets.InputError as e:  # another dataset in the way: one line, nothing removed
    raise SystemExit(f'benchmarks.hand_2d: {e}') from None
  start = time.time()
  train, test = (
      load_split(os.path.join(root, f'{split}.yaml'), config.data.image_size)
      for split in ('train', 'test')
  )
  print(
      f'{len(train[0])} train / {len(test[0])} test hands from {root}, '
      f'{config.data.image_size}-px crops of {synthetic.image_size}-px images '
      f'(loaded in {time.time() - start:.0f} s)\n'
  )
  if 'lifting' in _PARTS.value:
    noise = [float(n) for n in _NOISE.value]
    print(f'Lifting: MLP from 2D joints with noise to 3D joints, {_LIFT_STEPS.value} steps\n')
    print(
        f'| 2D input (Gaussian noise per coordinate, {synthetic.image_size}-px image) '
        f'| its mean error ({config.data.image_size}-px crop px) | held-out PA-MPJPE (mm) |'
    )
    print('|---|---|---|')
    for name, crop_err, value in lifting_rows(train, test, noise, _LIFT_STEPS.value, _SEED.value):
      print(f"| {name} | {'-' if crop_err is None else f'{crop_err:.2f}'} | {value:.1f} |")
    print()
  if 'localisation' in _PARTS.value:
    print(
        f'Localisation: ResNet depths {tuple(config.model.resnet_depths)}, width '
        f'{config.model.resnet_width}, linear head, {_STEPS.value} steps\n'
    )
    print(f'| 2D joints | held-out error ({config.data.image_size}-px crop px) | training error |')
    print('|---|---|---|')
    for name, test_px, train_px in localisation_rows(
        config, train, test, _STEPS.value, _SEED.value
    ):
      print(f"| {name} | {test_px:.2f} | {'-' if train_px is None else f'{train_px:.2f}'} |")


if __name__ == '__main__':
  app.run(main)
