"""METRO/GraphCMR training augmentation as NumPy/OpenCV ops.

One affine matrix per example (`image_ops.crop_matrix`) maps original-image
pixels to crop pixels; the image is warped with it (one `cv2.warpAffine`) and
the 2D joints are mapped with the same matrix, so a joint lands exactly on the
image content it labels. The pixel, crop-box and normalised-coordinate
conventions are `coarsemetro_jax.image_ops`'; on top of them:
  * A positive rotation `rot` (degrees) turns the image content counter-
    clockwise on screen; 3D joints and the global orientation turn with it
    (R = Rz(-rot) in the y-down camera frame).
  * Flipping mirrors the crop, permutes joints with `joints.J24_FLIP_PERM`,
    negates 3D x, and flips the pose with `joints.SMPL_FLIP_PERM` plus negated
    axis-angle y and z (METRO `flip_pose`).

Differences from METRO's code, all within a crop pixel: METRO rounds the crop
box corners and keypoints to integers (`transform(...).astype(int) + 1`),
resizes a padded, rotated crop, and negates normalised x on a flip while the
image mirrors about (S - 1) / 2 (one pixel apart); here image and joints use
the same continuous matrix. The warped image is kept as uint8 (METRO keeps
float), i.e. rounded to the nearest level before the colour noise.
`config.data.crop = 'metro'` (data_pipelines/metro_crop.py) repeats METRO's
arithmetic for the image and 2D joints instead; `label_targets` then gives the
rest of the example with the same parameters.

Hands (`hand=True`, METRO's `HandMeshTSVDataset`): the same crop, scale,
rotation and colour noise, sampled by `sample_hand_params` (METRO's hand
order, and its rotation factor is 90 degrees: rotations up to 180), and never
a flip: FreiHAND has right hands only, and a flipped right hand would be a
left hand with a right hand's MANO label. 3D joints are centred at the wrist
(joint 0).
"""

import dataclasses

import cv2
import numpy as np

from coarsemetro_jax import image_ops
from coarsemetro_jax import joints

# METRO's augmentation constants (`MeshTSVDataset.__init__`, `augm_params`).
SCALE_FACTOR = 0.25  # sc ~ clip(N(1, 0.25), 0.75, 1.25)
ROT_FACTOR = 30.0  # rot ~ clip(N(0, 30), -60, 60) degrees
NOISE_FACTOR = 0.4  # pn ~ U[0.6, 1.4] per channel
FLIP_PROB = 0.5
ROT_ZERO_PROB = 0.6  # rotation is set to 0 with this probability
HAND_ROT_FACTOR = 90.0  # METRO's HandMeshTSVDataset: rot ~ clip(N(0, 90), -180, 180)
HAND_ROOT = 0  # the wrist, the root of the 21 hand joints

# The input pipeline decodes, augments and normalises an example through this
# module; these steps are the core's `image_ops`, shared with inference.
decode_jpeg = image_ops.decode_jpeg
color_normalize = image_ops.color_normalize
single_threaded_opencv = image_ops.single_threaded_opencv


@dataclasses.dataclass(frozen=True)
class AugParams:
  """Per-example crop and augmentation parameters (defaults: test time, no change)."""

  flip: bool = False
  rot: float = 0.0  # degrees
  sc: float = 1.0  # multiplies the label's scale
  pn: tuple = (1.0, 1.0, 1.0)  # per-channel (R, G, B) noise
  # How image and 2D joints are cropped: 'continuous' (`process_example`) or
  # 'metro' (metro_crop.image_and_joints_2d); config.data.crop / train_crop.
  crop: str = 'continuous'


def sample_params(
    rng, *, scale_factor=SCALE_FACTOR, rot_factor=ROT_FACTOR, noise_factor=NOISE_FACTOR
):
  """Samples training parameters like METRO's `augm_params` (same order)."""
  flip = rng.uniform() <= FLIP_PROB
  pn = rng.uniform(1 - noise_factor, 1 + noise_factor, 3)
  rot = min(2 * rot_factor, max(-2 * rot_factor, rng.standard_normal() * rot_factor))
  sc = min(1 + scale_factor, max(1 - scale_factor, rng.standard_normal() * scale_factor + 1))
  if rng.uniform() <= ROT_ZERO_PROB:
    rot = 0.0
  return AugParams(flip=bool(flip), rot=float(rot), sc=float(sc), pn=tuple(float(p) for p in pn))


def sample_hand_params(
    rng, *, scale_factor=SCALE_FACTOR, rot_factor=HAND_ROT_FACTOR, noise_factor=NOISE_FACTOR
):
  """Samples hand training parameters like METRO's hand `augm_params` (same order, no flip)."""
  pn = rng.uniform(1 - noise_factor, 1 + noise_factor, 3)
  rot = min(2 * rot_factor, max(-2 * rot_factor, rng.standard_normal() * rot_factor))
  sc = min(1 + scale_factor, max(1 - scale_factor, rng.standard_normal() * scale_factor + 1))
  if rng.uniform() <= ROT_ZERO_PROB:
    rot = 0.0
  return AugParams(flip=False, rot=float(rot), sc=float(sc), pn=tuple(float(p) for p in pn))


def transform_joints_2d(joints_2d, matrix, size, flip=False):
  """[24, 3] pixel joints -> crop joints normalised to [-1, 1] (+ visibility).

  `matrix` already contains the flip; `flip` only permutes left and right.
  """
  xy = joints_2d[:, :2] @ matrix[:, :2].T + matrix[:, 2]  # [24, 2] crop px
  out = np.concatenate([2.0 * (xy + 0.5) / size - 1.0, joints_2d[:, 2:]], 1)
  if flip:
    out = out[list(joints.J24_FLIP_PERM)]
  return out.astype(np.float32)


def transform_joints_3d(joints_3d, rot=0.0, flip=False, root=joints.J24_PELVIS):
  """[24, 4] camera-frame joints: centre at the J24 pelvis (or joint `root`), rotate, flip."""
  out = np.array(joints_3d, np.float64)
  out[:, :3] -= out[root, :3]
  out[:, :2] = out[:, :2] @ image_ops.rotation_2d(rot).T
  if flip:
    out = out[list(joints.J24_FLIP_PERM)]
    out[:, 0] = -out[:, 0]
  return out.astype(np.float32)


def rotate_axis_angle(aa, rot):
  """Turns an axis-angle rotation by Rz(-rot) in the camera frame (`rot_aa`)."""
  rz = np.eye(3)
  rz[:2, :2] = image_ops.rotation_2d(rot)
  mat, _ = cv2.Rodrigues(np.asarray(aa, np.float64).reshape(3, 1))
  out, _ = cv2.Rodrigues(rz @ mat)
  return out[:, 0]


def flip_pose(pose):
  """METRO `flip_pose`: swap left/right SMPL joints, negate y and z."""
  out = np.asarray(pose).reshape(joints.NUM_SMPL_JOINTS, 3)
  out = out[list(joints.SMPL_FLIP_PERM)].copy()
  out[:, 1:] = -out[:, 1:]
  return out.reshape(-1)


def transform_pose(pose, rot=0.0, flip=False):
  """[72] SMPL pose: global orientation rotated with the image, then flip."""
  out = np.array(pose, np.float64)
  if rot:
    out[:3] = rotate_axis_angle(out[:3], rot)
  if flip:
    out = flip_pose(out)
  return out.astype(np.float32)


def label_targets(label, params, hand=False):
  """The targets that do not depend on the crop, rotated and flipped by `params`.

  Returns:
    dict: joints_3d [24, 4], pose [72], betas [10], has_2d_joints,
    has_3d_joints, has_smpl (float32). With hand=True (a hand label):
    joints_3d [21, 4] centred at the wrist, pose [48], and is_left.
  """
  if hand and params.flip:
    raise ValueError('hand examples are never flipped (a flipped right hand is a left hand)')
  root = HAND_ROOT if hand else joints.J24_PELVIS
  out = {
      'joints_3d': transform_joints_3d(label['joints_3d'], params.rot, params.flip, root),
      'pose': transform_pose(label['pose'], params.rot, params.flip),
      'betas': np.asarray(label['betas'], np.float32),
      'has_2d_joints': np.float32(label['has_2d_joints']),
      'has_3d_joints': np.float32(label['has_3d_joints']),
      'has_smpl': np.float32(label['has_smpl']),
  }
  if hand:
    out['is_left'] = np.float32(label['is_left'])
  return out


def process_example(image, label, params, size, hand=False):
  """Crops (continuously) and augments one example.

  Args:
    image: RGB uint8 [H, W, 3].
    label: `metro_labels.parse_label` dict.
    params: AugParams (AugParams() at test time); `params.crop` is not read.
    size: crop side S.
    hand: a hand label (`label_targets`).

  Returns:
    dict: image uint8 [S, S, 3] (the crop, before `color_normalize`), pn [3]
    float32 (the colour noise), joints_2d, and the `label_targets`.
  """
  matrix = image_ops.crop_matrix(
      label['center'], params.sc * label['scale'], size, params.rot, params.flip
  )
  return {
      'image': image_ops.warp_image(image, matrix, size),
      'pn': np.asarray(params.pn, np.float32),
      'joints_2d': transform_joints_2d(label['joints_2d'], matrix, size, params.flip),
      **label_targets(label, params, hand),
  }
