"""METRO/GraphCMR augmentation (reference §4.3) as NumPy/OpenCV ops.

One affine matrix per example maps original-image pixels to crop pixels; the
image is warped with it (one `cv2.warpAffine`) and the 2D joints are mapped with
the same matrix, so a joint lands exactly on the image content it labels.

Conventions:
  * Pixel coordinates have pixel centres at integers (OpenCV). The crop box is a
    square of side 200 * sc * scale centred at `center`, mapped onto the S x S
    crop so that `center` lands at the crop centre (S - 1) / 2.
  * Normalised 2D joints are 2 * (x' + 0.5) / S - 1, i.e. 2 * px / S - 1 with
    px the continuous crop coordinate: the crop borders are -1 and 1, the box
    centre is 0, and a horizontal flip is exactly x -> -x.
  * A positive rotation `rot` (degrees) turns the image content counter-
    clockwise on screen, as METRO's `crop(..., rot=rot)`; 3D joints and the
    global orientation turn with it (R = Rz(-rot) in the y-down camera frame).
  * Flipping mirrors the crop, permutes joints with `joints.J24_FLIP_PERM`,
    negates 3D x, and flips the pose with `joints.SMPL_FLIP_PERM` plus negated
    axis-angle y and z (METRO `flip_pose`).

Differences from METRO's code, all within a crop pixel: METRO rounds the crop
box corners and keypoints to integers (`transform(...).astype(int) + 1`),
resizes a padded, rotated crop, and negates normalised x on a flip while the
image mirrors about (S - 1) / 2 (one pixel apart); here image and joints use
the same continuous matrix. The warped image is kept as uint8 (METRO keeps
float), i.e. rounded to the nearest level before the colour noise.
"""

import dataclasses

import cv2
import numpy as np

from coarsemetro_jax import joints

# METRO's augmentation constants (`MeshTSVDataset.__init__`, `augm_params`).
SCALE_FACTOR = 0.25   # sc ~ clip(N(1, 0.25), 0.75, 1.25)
ROT_FACTOR = 30.0     # rot ~ clip(N(0, 30), -60, 60) degrees
NOISE_FACTOR = 0.4    # pn ~ U[0.6, 1.4] per channel
FLIP_PROB = 0.5
ROT_ZERO_PROB = 0.6   # rotation is set to 0 with this probability
BOX_SIZE = 200.0      # `scale` is the box side in units of 200 px
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugParams:
  """Per-example augmentation parameters (defaults: test time, §6)."""
  flip: bool = False
  rot: float = 0.0                     # degrees
  sc: float = 1.0                      # multiplies the label's scale
  pn: tuple = (1.0, 1.0, 1.0)          # per-channel (R, G, B) noise


def sample_params(rng, *, scale_factor=SCALE_FACTOR, rot_factor=ROT_FACTOR,
                  noise_factor=NOISE_FACTOR):
  """Samples training parameters like METRO's `augm_params` (same order)."""
  flip = rng.uniform() <= FLIP_PROB
  pn = rng.uniform(1 - noise_factor, 1 + noise_factor, 3)
  rot = min(2 * rot_factor, max(-2 * rot_factor, rng.standard_normal() *
                                rot_factor))
  sc = min(1 + scale_factor, max(1 - scale_factor, rng.standard_normal() *
                                 scale_factor + 1))
  if rng.uniform() <= ROT_ZERO_PROB:
    rot = 0.0
  return AugParams(flip=bool(flip), rot=float(rot), sc=float(sc),
                   pn=tuple(float(p) for p in pn))


def rotation_2d(rot):
  """In-plane rotation [2, 2] for y-down coordinates (METRO's Rz(-rot))."""
  a = np.deg2rad(rot)
  return np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def crop_matrix(center, scale, size, rot=0.0, flip=False):
  """Affine [2, 3] from original-image pixels to crop pixels.

  Args:
    center: [2] box centre (x, y), original-image pixels.
    scale: box side / 200 (already multiplied by the augmentation's sc).
    size: crop side S.
    rot: rotation in degrees (counter-clockwise on screen).
    flip: mirror the crop horizontally.

  Returns:
    [2, 3] float64 matrix M; crop_xy = M[:, :2] @ xy + M[:, 2].
  """
  zoom = size / (BOX_SIZE * scale)
  mid = (size - 1) / 2.0
  lin = zoom * rotation_2d(rot)                          # [2, 2]
  offset = mid - lin @ np.asarray(center, np.float64)    # [2]
  if flip:  # x' -> S - 1 - x'
    lin[0] = -lin[0]
    offset[0] = size - 1 - offset[0]
  return np.concatenate([lin, offset[:, None]], axis=1)


def single_threaded_opencv():
  """Process-wide: OpenCV runs each call on the calling thread."""
  cv2.setNumThreads(1)


def decode_jpeg(jpeg):
  """JPEG bytes -> RGB uint8 [H, W, 3] (cv2, as METRO); None if corrupt."""
  bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
  if bgr is None:
    return None
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def warp_image(image, matrix, size):
  """Bilinear crop [S, S, C] of `image` through `matrix`, zero outside."""
  return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def transform_joints_2d(joints_2d, matrix, size, flip=False):
  """[24, 3] pixel joints -> crop joints normalised to [-1, 1] (+ visibility).

  `matrix` already contains the flip; `flip` only permutes left and right.
  """
  xy = joints_2d[:, :2] @ matrix[:, :2].T + matrix[:, 2]   # [24, 2] crop px
  out = np.concatenate([2.0 * (xy + 0.5) / size - 1.0, joints_2d[:, 2:]], 1)
  if flip:
    out = out[list(joints.J24_FLIP_PERM)]
  return out.astype(np.float32)


def transform_joints_3d(joints_3d, rot=0.0, flip=False):
  """[24, 4] camera-frame joints: centre at the J24 pelvis, rotate, flip."""
  out = np.array(joints_3d, np.float64)
  out[:, :3] -= out[joints.J24_PELVIS, :3]
  out[:, :2] = out[:, :2] @ rotation_2d(rot).T
  if flip:
    out = out[list(joints.J24_FLIP_PERM)]
    out[:, 0] = -out[:, 0]
  return out.astype(np.float32)


def rotate_axis_angle(aa, rot):
  """Turns an axis-angle rotation by Rz(-rot) in the camera frame (`rot_aa`)."""
  rz = np.eye(3)
  rz[:2, :2] = rotation_2d(rot)
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


def color_normalize(image, pn):
  """Colour noise, then ImageNet normalisation: uint8 RGB -> float32.

  Every pixel becomes (min(x * pn_c, 255) / 255 - mean_c) / std_c (METRO's
  clip, /255 and `Normalize`). The result depends only on the uint8 level, so
  it is a 256-entry table per channel applied in one `cv2.LUT` pass, about ten
  times cheaper than the float arithmetic on the whole crop.

  Args:
    image: uint8 [H, W, 3] RGB.
    pn: [3] per-channel noise (1 at test time).

  Returns:
    float32 [H, W, 3].
  """
  levels = np.arange(256, dtype=np.float32)[:, None]                # [256, 1]
  noisy = np.minimum(levels * np.asarray(pn, np.float32), 255.0)   # [256, 3]
  lut = (noisy / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  return cv2.LUT(image, lut.astype(np.float32)[None])


def process_example(image, label, params, size):
  """Crops and augments one example.

  Args:
    image: RGB uint8 [H, W, 3].
    label: `metro_labels.parse_label` dict.
    params: AugParams (AugParams() at test time).
    size: crop side S.

  Returns:
    dict: image uint8 [S, S, 3] (the crop, before `color_normalize`), pn [3]
    float32 (the colour noise), joints_2d, joints_3d, pose, betas,
    has_2d_joints, has_3d_joints, has_smpl.
  """
  matrix = crop_matrix(label['center'], params.sc * label['scale'], size,
                       params.rot, params.flip)
  return {
      'image': warp_image(image, matrix, size),
      'pn': np.asarray(params.pn, np.float32),
      'joints_2d': transform_joints_2d(label['joints_2d'], matrix, size,
                                       params.flip),
      'joints_3d': transform_joints_3d(label['joints_3d'], params.rot,
                                       params.flip),
      'pose': transform_pose(label['pose'], params.rot, params.flip),
      'betas': np.asarray(label['betas'], np.float32),
      'has_2d_joints': np.float32(label['has_2d_joints']),
      'has_3d_joints': np.float32(label['has_3d_joints']),
      'has_smpl': np.float32(label['has_smpl']),
  }
