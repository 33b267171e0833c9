"""Augmentation ops against NumPy references built from the same parameters."""

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from coarsemetro_jax import image_ops
from coarsemetro_jax import joints
from data_pipelines import augment

S = 64  # crop side

# METRO `flip_pose`'s literal index list (src/utils/image_ops.py).
METRO_FLIPPED_PARTS = [
    0,
    1,
    2,
    6,
    7,
    8,
    3,
    4,
    5,
    9,
    10,
    11,
    15,
    16,
    17,
    12,
    13,
    14,
    18,
    19,
    20,
    24,
    25,
    26,
    21,
    22,
    23,
    27,
    28,
    29,
    33,
    34,
    35,
    30,
    31,
    32,
    36,
    37,
    38,
    42,
    43,
    44,
    39,
    40,
    41,
    45,
    46,
    47,
    51,
    52,
    53,
    48,
    49,
    50,
    57,
    58,
    59,
    54,
    55,
    56,
    63,
    64,
    65,
    60,
    61,
    62,
    69,
    70,
    71,
    66,
    67,
    68,
]
PARAMS = [
    augment.AugParams(),
    augment.AugParams(rot=35.0, sc=1.2),
    augment.AugParams(flip=True, sc=0.8),
    augment.AugParams(flip=True, rot=-50.0, sc=1.1),
]


def metro_get_transform(center, scale, res, rot=0.0):
  """METRO's `get_transform` (3 x 3; before its integer rounding)."""
  h = 200 * scale
  t = np.zeros((3, 3))
  t[0, 0] = res / h
  t[1, 1] = res / h
  t[0, 2] = res * (-center[0] / h + 0.5)
  t[1, 2] = res * (-center[1] / h + 0.5)
  t[2, 2] = 1
  if rot:
    a = -rot * np.pi / 180
    rot_mat = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    t_mat = np.eye(3)
    t_mat[:2, 2] = -res / 2
    t_inv = np.eye(3)
    t_inv[:2, 2] = res / 2
    t = t_inv @ rot_mat @ t_mat @ t
  return t


def _blob(height, width, x0, y0, sigma=2.0):
  yy, xx = np.mgrid[:height, :width]
  g = 255 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
  return np.repeat(np.round(g).astype(np.uint8)[..., None], 3, axis=2)


def _centroid(image):
  """Intensity-weighted centroid (x, y) of the bright pixels, crop px."""
  w = image[..., 0].astype(np.float64)
  w = np.where(w > 0.1 * w.max(), w, 0)
  yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
  return np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()


def _label(center=(170.0, 130.0), scale=0.5):
  rng = np.random.default_rng(0)
  j2d = np.c_[np.asarray(center) + rng.uniform(-30, 30, (24, 2)), rng.integers(0, 2, 24)]
  j3d = np.c_[rng.normal(0, 0.4, (24, 3)) + [0, 0, 3], rng.uniform(0, 1, 24)]
  return {
      'center': np.array(center, np.float32),
      'scale': np.float32(scale),
      'joints_2d': j2d.astype(np.float32),
      'joints_3d': j3d.astype(np.float32),
      'pose': rng.normal(0, 0.3, 72).astype(np.float32),
      'betas': rng.normal(0, 1, 10).astype(np.float32),
      'has_2d_joints': np.float32(1),
      'has_3d_joints': np.float32(1),
      'has_smpl': np.float32(1),
  }


@pytest.mark.parametrize('params', PARAMS)
def test_joint_lands_on_its_image_content(params):
  """A bright dot drawn at a joint is found where the joint is mapped to."""
  label = _label()
  for j in (0, 6, 13):  # R_Ankle, R_Wrist, Top_of_Head
    x0, y0 = label['joints_2d'][j, :2]
    out = augment.process_example(_blob(260, 340, x0, y0), label, params, S)
    # After a flip, joint j's content is labelled by its mirror partner.
    k = joints.J24_FLIP_PERM[j] if params.flip else j
    found = 2 * (_centroid(out['image']) + 0.5) / S - 1
    np.testing.assert_allclose(out['joints_2d'][k, :2], found, atol=2 * 0.1 / S)  # 0.1 crop px


@pytest.mark.parametrize('params', PARAMS)
def test_joints_2d_match_metro_transform(params):
  """Normalised joints = METRO's 2 t(x) / S - 1 before its int rounding."""
  label = _label()
  scale = params.sc * label['scale']
  matrix = image_ops.crop_matrix(label['center'], scale, S, params.rot, params.flip)
  out = augment.transform_joints_2d(label['joints_2d'], matrix, S, params.flip)
  t = metro_get_transform(label['center'], scale, S, params.rot)
  ref = np.c_[label['joints_2d'][:, :2], np.ones(24)] @ t[:2].T
  ref = np.c_[2 * ref / S - 1, label['joints_2d'][:, 2]]
  if params.flip:  # METRO flip_kp
    ref = ref[list(joints.J24_FLIP_PERM)]
    ref[:, 0] = -ref[:, 0]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # METRO itself rounds t(x) down and adds 1: within one crop pixel of ours.
  metro = np.c_[label['joints_2d'][:, :2] + 1 - 1, np.ones(24)] @ t[:2].T
  metro = 2 * (metro.astype(int) + 1) / S - 1
  if not params.flip:
    assert np.abs(out[:, :2] - metro).max() <= 2 / S


def test_test_time_crop_is_the_200_scale_box_resized():
  """sc=1, r=0: the crop is the 200*scale box around center, resized to S."""
  rng = np.random.default_rng(1)
  image = cv2.GaussianBlur(rng.integers(0, 255, (120, 150, 3), np.uint8), (0, 0), 3)
  x0, y0, side = 30, 20, 80  # box pixels [x0, x0 + side) x [y0, y0 + side)
  # Box edges at x0 - 0.5 and x0 + side - 0.5 (pixel centres at integers).
  label = {
      **_label(),
      'center': np.array([x0 + side / 2 - 0.5, y0 + side / 2 - 0.5]),
      'scale': side / 200,
  }
  out = augment.process_example(image, label, augment.AugParams(), S)
  ref = cv2.resize(image[y0 : y0 + side, x0 : x0 + side], (S, S), interpolation=cv2.INTER_LINEAR)
  diff = np.abs(out['image'].astype(int) - ref.astype(int))
  assert diff.mean() < 0.5 and diff.max() <= 3  # fixed-point rounding only
  np.testing.assert_array_equal(out['pn'], [1, 1, 1])
  np.testing.assert_array_equal(out['betas'], label['betas'])


def test_flip_twice_is_identity():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 255, (100, 120, 3), np.uint8)
  label = _label(center=(60, 50), scale=0.4)
  plain = augment.process_example(image, label, augment.AugParams(rot=20), S)
  flipped = augment.process_example(image, label, augment.AugParams(rot=20, flip=True), S)
  # The flipped crop is the mirrored crop (up to fixed-point rounding).
  diff = np.abs(flipped['image'][:, ::-1].astype(int) - plain['image'])
  assert diff.max() <= 1 and diff.mean() < 0.05
  perm = list(joints.J24_FLIP_PERM)
  j2d = flipped['joints_2d'][perm] * [-1, 1, 1]
  np.testing.assert_allclose(j2d, plain['joints_2d'], atol=1e-6)
  j3d = flipped['joints_3d'][perm] * [-1, 1, 1, 1]
  np.testing.assert_allclose(j3d, plain['joints_3d'], atol=1e-6)
  np.testing.assert_allclose(augment.flip_pose(flipped['pose']), plain['pose'], atol=1e-6)
  pose = rng.normal(size=72)
  np.testing.assert_array_equal(augment.flip_pose(augment.flip_pose(pose)), pose)


def test_flip_pose_matches_metro_index_list():
  pose = np.arange(72, dtype=np.float64) + 1
  ref = pose[METRO_FLIPPED_PARTS]
  ref[1::3] *= -1
  ref[2::3] *= -1
  np.testing.assert_array_equal(augment.flip_pose(pose), ref)
  # Hand-computed: the left hip (SMPL 1) takes the right hip's (SMPL 2) values.
  np.testing.assert_array_equal(augment.flip_pose(pose)[3:6], [7, -8, -9])


@pytest.mark.parametrize('params', PARAMS)
def test_joints_3d_match_metro_processing(params):
  label = _label()
  out = augment.transform_joints_3d(label['joints_3d'], params.rot, params.flip)
  # METRO: subtract the pelvis, then `j3d_processing` (einsum, flip_kp).
  s = label['joints_3d'].astype(np.float64).copy()
  s[:, :-1] -= s[14, :-1]
  a = -params.rot * np.pi / 180
  rot_mat = np.eye(3)
  rot_mat[0, :2] = [np.cos(a), -np.sin(a)]
  rot_mat[1, :2] = [np.sin(a), np.cos(a)]
  s[:, :-1] = np.einsum('ij,kj->ki', rot_mat, s[:, :-1])
  if params.flip:
    s = s[list(joints.J24_FLIP_PERM)]
    s[:, 0] = -s[:, 0]
  np.testing.assert_allclose(out, s, atol=1e-6)
  np.testing.assert_allclose(out[joints.J24_PELVIS, :3], 0, atol=1e-7)


def test_rotate_axis_angle():
  # Hand-computed: a rotation about the camera z axis loses r degrees.
  out = augment.rotate_axis_angle([0, 0, 0.5], 30)
  np.testing.assert_allclose(out, [0, 0, 0.5 - np.pi / 6], atol=1e-7)
  # General case against scipy: R' = Rz(-r) R.
  aa = np.array([0.3, -1.1, 0.4])
  ref = (Rotation.from_euler('z', -40, degrees=True) * Rotation.from_rotvec(aa)).as_rotvec()
  np.testing.assert_allclose(augment.rotate_axis_angle(aa, 40), ref, atol=1e-7)
  pose = np.r_[aa, np.arange(69) / 100]
  out = augment.transform_pose(pose, 40, flip=False)
  np.testing.assert_allclose(out[:3], ref, atol=1e-6)
  np.testing.assert_allclose(out[3:], pose[3:], atol=1e-7)


@pytest.mark.parametrize('params', PARAMS)
def test_rotation_keeps_2d_and_3d_joints_consistent(params):
  """2D joints of a weak-perspective camera stay a projection of the 3D ones.

  In the original image the 2D joints are a * X[:, :2] + b of the 3D joints
  (y down in both). After any crop/rotation/flip they must still be
  s * X'[:, :2] + t: image and 3D joints turn the same way.
  """
  label = _label()
  x = label['joints_3d'][:, :2].astype(np.float64)
  label['joints_2d'][:, :2] = 90 * x + [170, 130]
  out = augment.process_example(np.zeros((260, 340, 3), np.uint8), label, params, S)
  p2, p3 = out['joints_2d'][:, :2], out['joints_3d'][:, :2]
  # Least squares for s, tx, ty.
  a = np.zeros((48, 3))
  a[:, 0] = p3.reshape(-1)
  a[0::2, 1] = 1
  a[1::2, 2] = 1
  sol, *_ = np.linalg.lstsq(a, p2.reshape(-1), rcond=None)
  np.testing.assert_allclose(a @ sol, p2.reshape(-1), atol=1e-5)
  zoom = S / (200 * params.sc * label['scale'])
  np.testing.assert_allclose(sol[0], 90 * zoom * 2 / S, rtol=1e-5)


def test_global_orientation_turns_with_the_joints():
  """Rotating the pose's root turns body-frame vectors like the 3D joints."""
  label = _label()
  for params in PARAMS[1:]:
    out = augment.process_example(np.zeros((40, 40, 3), np.uint8), label, params, S)
    root = Rotation.from_rotvec(label['pose'][:3])
    new_root = Rotation.from_rotvec(out['pose'][:3])
    v = np.array([0.1, -0.2, 0.3])  # a body-frame offset, e.g. a joint
    before = np.r_[root.apply(v), 1][None].repeat(24, 0)
    before[joints.J24_PELVIS, :3] = 0
    after = augment.transform_joints_3d(before, params.rot, params.flip)
    k = joints.J24_FLIP_PERM[0] if params.flip else 0
    if params.flip:  # the flipped body mirrors the offset (x -> -x)
      v = v * [-1, 1, 1]
    np.testing.assert_allclose(new_root.apply(v), after[k, :3], atol=1e-6)


def test_sample_params_follow_metro_distribution():
  rng = np.random.default_rng(0)
  samples = [augment.sample_params(rng) for _ in range(4000)]
  flips = np.mean([p.flip for p in samples])
  rots = np.array([p.rot for p in samples])
  scs = np.array([p.sc for p in samples])
  pns = np.array([p.pn for p in samples])
  assert abs(flips - 0.5) < 0.04
  assert abs(np.mean(rots == 0) - 0.6) < 0.04
  assert np.abs(rots).max() <= 60 and 0.75 <= scs.min() and scs.max() <= 1.25
  assert 0.6 <= pns.min() and pns.max() <= 1.4
  nonzero = rots[rots != 0]
  assert abs(np.std(nonzero) - 28.5) < 3  # N(0, 30) clipped at +-60
  assert np.mean(scs == 1.25) > 0.1  # clipping piles up at the bounds
