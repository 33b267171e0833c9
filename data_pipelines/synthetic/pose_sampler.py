"""Random plausible SMPL poses and adult shapes, deterministic given a Generator.

A joint's local rotation is sampled as intrinsic Euler angles
R_local = Rx(flex) Rz(side) Ry(twist) in an anatomical frame built from the rest
pose: y = the bone direction (towards the joint's child, the twist axis); for
legs, spine and head x = the body's lateral axis (+X, towards the body's left)
made orthogonal to y; for the arm chain z = the forward axis (+Z) made
orthogonal to y. SMPL's axis-angle of the joint is then that of A R_local A^T
(A = [x y z]), since SMPL's rest pose has all joint frames aligned with the
body axes (Y up, face +Z).

Knee and elbow flexion is measured from the straight limb (`rest_flexion`),
whatever the bend of the rest mesh. Limits are written for left and central
joints; a right joint is sampled with its left twin's limits and frame and
mirrored through the sagittal plane (axis-angle (x, y, z) -> (x, -y, -z), as
SMPL's flip). The shoulder is sampled
as a target direction of the upper arm (elevation from hanging down, azimuth
from lateral towards forward) plus a twist, so the limits do not depend on
whether the rest pose is a T- or an A-pose.

Poses come from a small mixture of activities (generic, standing, walking,
crouching, bending, reaching) and can be rejected when a forearm or hand enters
the torso or the legs cross (capsule tests on the posed skeleton).
"""

import numpy as np
from scipy.spatial.transform import Rotation

from data_pipelines.synthetic import body_np

# Per joint: (lo, hi, mean) in degrees for the flex (x), twist (y) and side (z)
# Euler angles. Signs, verified by tests/test_synthetic.py: hip x < 0 moves the
# thigh forward, hip z < 0 abducts the left leg; knee x > 0 bends the shank
# backwards; spine x > 0 bends forward; elbow x > 0 brings the forearm forward.
LIMITS_DEG = {
    1: ((-115, 25, -10), (-35, 35, 0), (-45, 20, -5)),  # L hip
    3: ((-15, 40, 5), (-20, 20, 0), (-15, 15, 0)),  # spine1
    4: ((0, 150, 12), (-5, 5, 0), (-3, 3, 0)),  # L knee
    6: ((-10, 25, 3), (-20, 20, 0), (-12, 12, 0)),  # spine2
    7: ((-30, 30, 0), (-15, 15, 0), (-10, 10, 0)),  # L ankle
    9: ((-10, 20, 2), (-15, 15, 0), (-10, 10, 0)),  # spine3
    10: ((-15, 15, 0), (-5, 5, 0), (-5, 5, 0)),  # L foot (toes)
    12: ((-25, 35, 5), (-35, 35, 0), (-20, 20, 0)),  # neck
    13: ((-15, 20, 0), (-10, 10, 0), (-10, 25, 0)),  # L collar
    15: ((-25, 30, 0), (-35, 35, 0), (-15, 15, 0)),  # head
    16: ((0, 0, 0), (-60, 60, 0), (0, 0, 0)),  # L shoulder: twist only here
    18: ((0, 150, 25), (-40, 40, 0), (-5, 5, 0)),  # L elbow
    20: ((-45, 45, 0), (-30, 30, 0), (-25, 25, 0)),  # L wrist
    22: ((-20, 20, 0), (-5, 5, 0), (-20, 20, 0)),  # L hand
}
# Upper-arm direction: elevation from hanging straight down, azimuth from the
# lateral direction towards the front (degrees). Backwards (azimuth < 0) the
# arm rises at most SHOULDER_BACK_MAX_ELEV.
SHOULDER_ELEV = (8.0, 170.0)
SHOULDER_AZIM = (-100.0, 130.0)
SHOULDER_BACK_MAX_ELEV = 60.0
# Global orientation: yaw (0 = facing the camera), pitch (forward lean) and
# roll, std and bound. Yaw leans frontal, as in photo datasets (COCO, 3DPW),
# but reaches side views and beyond.
YAW_STD, YAW_MAX = 45.0, 120.0
PITCH_STD, PITCH_MAX = 7.0, 20.0
ROLL_STD, ROLL_MAX = 5.0, 15.0
MAX_LEAN = 85.0  # Total forward pitch of the pelvis (bending, crouching).

LEFT_RIGHT = ((1, 2), (4, 5), (7, 8), (10, 11), (13, 14), (16, 17), (18, 19), (20, 21), (22, 23))
RIGHT_TO_LEFT = {r: l for l, r in LEFT_RIGHT}
# Bone used as the twist axis: joint -> child (leaf joints use parent -> joint).
_CHILD = {1: 4, 3: 6, 4: 7, 6: 9, 7: 10, 9: 12, 12: 15, 13: 16, 16: 18, 18: 20, 20: 22}
_ARM_CHAIN = (13, 16, 18, 20, 22)
HINGES = (4, 18)  # Knee and elbow: flexion measured from the straight limb.
MODES = ('generic', 'stand', 'walk', 'crouch', 'bend', 'reach')
MODE_PROBS = (0.35, 0.18, 0.2, 0.1, 0.09, 0.08)
MIRROR = np.diag([-1.0, 1.0, 1.0])
# Euler convention of R_local (intrinsic X, then Z, then Y).
EULER = 'XZY'


def _cross(a, b):
  """Cross product of two 3-vectors (np.cross costs 10x more at this size)."""
  return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def joint_frames(rest_joints):
  """[24, 3, 3] anatomical frames (columns x, y, z) of the left/central joints."""
  rest_joints = np.asarray(rest_joints, np.float64)
  frames = np.tile(np.eye(3), (24, 1, 1))
  for j in LIMITS_DEG:
    child = _CHILD.get(j)
    parent = body_np.PARENTS[j]
    bone = rest_joints[child] - rest_joints[j] if child else rest_joints[j] - rest_joints[parent]
    y = bone / np.linalg.norm(bone)
    if j in _ARM_CHAIN:
      z = np.array([0.0, 0.0, 1.0]) - y[2] * y
      z /= np.linalg.norm(z)
      x = _cross(y, z)
    else:
      x = np.array([1.0, 0.0, 0.0]) - y[0] * y
      x /= np.linalg.norm(x)
      z = _cross(x, y)
    frames[j] = np.stack([x, y, z], axis=1)
  return frames


def rest_flexion(rest_joints, frames):
  """[24] flexion (degrees) of the hinge joints in the rest pose, 0 elsewhere.

  The angle about the joint's x axis from the parent bone to the joint's bone:
  a rest mesh whose elbows or knees are already bent (MakeHuman's are, by
  about 40 and 8 degrees) keeps the anatomical flexion limits measured from
  the straight limb.
  """
  rest_joints = np.asarray(rest_joints, np.float64)
  flex = np.zeros(24)
  for j in HINGES:
    x, y = frames[j][:, 0], frames[j][:, 1]
    u = rest_joints[j] - rest_joints[body_np.PARENTS[j]]
    u = u - (u @ x) * x
    flex[j] = np.rad2deg(np.arctan2(x @ _cross(u, y), u @ y))
  return flex


def local_to_rotmat(frame, euler_deg, rest_flex=0.0):
  """SMPL rotation of a joint from its anatomical Euler angles (x, y, z order).

  x is the flexion from the straight limb; the rest pose has `rest_flex`.
  """
  x, y, z = euler_deg
  r_local = Rotation.from_euler(EULER, [x - rest_flex, z, y], degrees=True).as_matrix()
  return frame @ r_local @ frame.T


def rotmat_to_local(frame, rotmat, rest_flex=0.0):
  """Inverse of `local_to_rotmat`: anatomical Euler angles (x, y, z) in degrees."""
  x, z, y = Rotation.from_matrix(frame.T @ rotmat @ frame).as_euler(EULER, degrees=True)
  return np.array([x + rest_flex, y, z])


def shoulder_direction(elev_deg, azim_deg):
  """Upper-arm unit direction of the LEFT arm in the body frame."""
  e, a = np.deg2rad(elev_deg), np.deg2rad(azim_deg)
  return np.array([np.sin(e) * np.cos(a), -np.cos(e), np.sin(e) * np.sin(a)])


def direction_to_shoulder(direction):
  """Inverse of `shoulder_direction`: (elevation, azimuth) in degrees."""
  d = direction / np.linalg.norm(direction)
  elev = np.rad2deg(np.arccos(np.clip(-d[1], -1.0, 1.0)))
  azim = np.rad2deg(np.arctan2(d[2], d[0]))
  return elev, azim


def _swing(src, dst):
  """Minimal rotation taking unit vector src onto unit vector dst."""
  axis = _cross(src, dst)
  s, c = np.linalg.norm(axis), float(np.dot(src, dst))
  if s < 1e-9:
    if c > 0:
      return np.eye(3)
    perp = np.cross(src, [1.0, 0.0, 0.0] if abs(src[0]) < 0.9 else [0.0, 1.0, 0.0])
    return body_np.axis_rotation(perp / np.linalg.norm(perp), np.pi)
  return body_np.axis_rotation(axis / s, np.arctan2(s, c))


def shoulder_rotmat(rest_joints, elev_deg, azim_deg, twist_deg):
  """Left shoulder rotation pointing the upper arm at (elev, azim), then twisted."""
  bone = rest_joints[18] - rest_joints[16]
  bone = bone / np.linalg.norm(bone)
  d = shoulder_direction(elev_deg, azim_deg)
  return body_np.axis_rotation(d, np.deg2rad(twist_deg)) @ _swing(bone, d)


def _trunc(rng, lo, hi, mean, spread):
  """Normal around `mean` with std spread*(hi-lo); out-of-range draws become uniform."""
  v = mean + spread * (hi - lo) * rng.standard_normal()
  return v if lo <= v <= hi else rng.uniform(lo, hi)


def _clip_to(j, axis, value):
  lo, hi, _ = LIMITS_DEG[j][axis]
  return float(np.clip(value, lo, hi))


def _sample_shoulder(rng, spread):
  """(elev, azim) of one arm; `spread` < 0.2 keeps arms low (standing)."""
  if spread < 0.2:
    return rng.uniform(SHOULDER_ELEV[0], 40.0), rng.uniform(-20.0, 60.0)
  band = rng.choice(3, p=(0.55, 0.3, 0.15))
  elev = rng.uniform(*((SHOULDER_ELEV[0], 60.0), (60.0, 120.0), (120.0, SHOULDER_ELEV[1]))[band])
  azim = rng.uniform(-45.0, SHOULDER_AZIM[1])
  if azim < 0:
    elev = min(elev, SHOULDER_BACK_MAX_ELEV)
  return elev, azim


def _mode_overrides(rng, mode, euler, shoulders):
  """Correlated angles of one activity, written into the left-frame tables.

  euler: {joint: [x, y, z]} (right joints in their left twin's frame);
  shoulders: {16/17: [elev, azim, twist]}. Returns the global pitch (degrees).
  """
  pitch = float(np.clip(PITCH_STD * rng.standard_normal(), -PITCH_MAX, PITCH_MAX))
  if mode == 'walk':
    phase, stride = rng.uniform(-1, 1), rng.uniform(20, 45)
    run = rng.uniform() < 0.35
    for hip, knee, sh, el, sgn in ((1, 4, 16, 18, 1), (2, 5, 17, 19, -1)):
      swing = sgn * phase * stride
      euler[hip][0] = _clip_to(1, 0, -swing - 5)
      knee_flex = (70 if run else 25) * max(0.0, -sgn * phase) + rng.uniform(0, 15)
      euler[knee][0] = _clip_to(4, 0, knee_flex)
      # The arm swings with the opposite leg, in the sagittal plane.
      arm = -swing * rng.uniform(0.6, 1.0)
      shoulders[sh][:2] = [abs(arm) + rng.uniform(SHOULDER_ELEV[0], 15), 90.0 if arm > 0 else -90.0]
      euler[el][0] = _clip_to(18, 0, rng.uniform(60, 110) if run else rng.uniform(5, 40))
    pitch += 10.0 if run else 0.0
  elif mode == 'crouch':
    for hip, knee, ankle in ((1, 4, 7), (2, 5, 8)):
      euler[hip][0] = _clip_to(1, 0, -rng.uniform(60, 115))
      euler[knee][0] = _clip_to(4, 0, rng.uniform(60, 145))
      euler[ankle][0] = _clip_to(7, 0, -rng.uniform(0, 25))
    euler[3][0] = _clip_to(3, 0, rng.uniform(0, 35))
    pitch += rng.uniform(0, 30)
  elif mode == 'bend':
    bend = rng.uniform(20, 80)
    pitch += bend
    for hip, knee in ((1, 4), (2, 5)):
      euler[hip][0] = _clip_to(1, 0, -bend + rng.uniform(-15, 10))
      euler[knee][0] = _clip_to(4, 0, rng.uniform(0, 30))
    euler[3][0] = _clip_to(3, 0, rng.uniform(0, 30))
    lean = pitch + euler[3][0] + euler[6][0] + euler[9][0]
    for sh in (16, 17):  # Arms hang towards the ground.
      if rng.uniform() < 0.7:
        shoulders[sh][:2] = [float(np.clip(lean, *SHOULDER_ELEV)), 90.0]
  elif mode == 'reach':
    for sh in (16, 17) if rng.uniform() < 0.5 else (16 + rng.integers(2),):
      shoulders[sh][:2] = [rng.uniform(100, SHOULDER_ELEV[1]), rng.uniform(0, 120)]
  return min(pitch, MAX_LEAN)


def _sample_once(rng, rest_joints, frames, rest_flex):
  """One candidate pose [72] (global orientation in the body frame)."""
  mode = MODES[rng.choice(len(MODES), p=MODE_PROBS)]
  spread = {'stand': 0.08, 'generic': 0.3}.get(mode, 0.15)
  euler, shoulders = {}, {}
  for j in range(1, 24):
    lim = LIMITS_DEG[RIGHT_TO_LEFT.get(j, j)]
    euler[j] = [_trunc(rng, lo, hi, mean, spread) for lo, hi, mean in lim]
  for sh in (16, 17):
    shoulders[sh] = [*_sample_shoulder(rng, spread), euler[sh][1]]
  pitch = _mode_overrides(rng, mode, euler, shoulders)
  yaw = float(np.clip(YAW_STD * rng.standard_normal(), -YAW_MAX, YAW_MAX))
  roll = float(np.clip(ROLL_STD * rng.standard_normal(), -ROLL_MAX, ROLL_MAX))
  rot = np.empty((24, 3, 3))
  # Yaw about the vertical, then lean forward (+X rotation tips the head to +Z).
  rot[0] = Rotation.from_euler('YXZ', [yaw, pitch, roll], degrees=True).as_matrix()
  for j in range(1, 24):
    left = RIGHT_TO_LEFT.get(j, j)
    if left == 16:
      r = shoulder_rotmat(rest_joints, *shoulders[j])
    else:
      r = local_to_rotmat(frames[left], euler[j], rest_flex[left])
    rot[j] = MIRROR @ r @ MIRROR if j in RIGHT_TO_LEFT else r
  return body_np.matrix_to_rotvec(rot).reshape(72)


def _segment_points(a, b, n=5, start=0.0):
  t = np.linspace(start, 1.0, n)[:, None]
  return a + t * (b - a)


def penetrates(pose, rest_joints):
  """Cheap self-penetration test on the posed skeleton.

  Forearms and hands (and the lower upper arm) are tested against an elliptic
  torso cylinder; the knees and shanks of the two legs against each other.
  """
  rest_joints = np.asarray(rest_joints, np.float64)
  rot = body_np.rotvec_to_matrix(np.asarray(pose).reshape(24, 3))
  rot[0] = np.eye(3)  # The test is independent of the global orientation.
  pos, _ = body_np.forward_kinematics(rest_joints, rot)
  half_width = 0.5 * np.linalg.norm(rest_joints[16] - rest_joints[17])
  a_lat, b_depth = 0.8 * half_width + 0.03, 0.55 * half_width + 0.03  # + arm radius
  up = pos[12] - pos[0]
  length = np.linalg.norm(up)
  up /= length
  lat = pos[16] - pos[17]
  lat -= (lat @ up) * up
  lat /= np.linalg.norm(lat)
  fwd = _cross(lat, up)
  for sh, el, wr, hand in ((16, 18, 20, 22), (17, 19, 21, 23)):
    pts = np.concatenate(
        [
            _segment_points(pos[sh], pos[el], 4, 0.5),
            _segment_points(pos[el], pos[wr], 5),
            _segment_points(pos[wr], pos[hand], 3),
        ]
    )
    rel = pts - pos[0]
    h = rel @ up
    in_ellipse = (rel @ lat / a_lat) ** 2 + (rel @ fwd / b_depth) ** 2 < 1.0
    inside = in_ellipse & (h > -0.05) & (h < length)
    if inside.any():
      return True
  legs = [
      np.concatenate(
          [_segment_points(pos[hip], pos[knee], 3, 0.6), _segment_points(pos[knee], pos[ankle], 5)]
      )
      for hip, knee, ankle in ((1, 4, 7), (2, 5, 8))
  ]
  dist = np.linalg.norm(legs[0][:, None] - legs[1][None], axis=-1)
  return bool(dist.min() < 0.09)


def sample_pose(rng, rest_joints, reject_penetration=True, max_tries=30):
  """Samples a plausible pose.

  Args:
    rng: numpy Generator (the only source of randomness).
    rest_joints: [24, 3] rest-pose joints (SMPL axes: Y up, face +Z).
    reject_penetration: resample poses that fail `penetrates`.
    max_tries: after this many rejections the last candidate is returned.

  Returns:
    [72] SMPL axis-angle pose, global orientation in the body (Y-up) frame.
  """
  frames = joint_frames(rest_joints)
  rest_flex = rest_flexion(rest_joints, frames)
  for _ in range(max_tries):
    pose = _sample_once(rng, rest_joints, frames, rest_flex)
    if not reject_penetration or not penetrates(pose, rest_joints):
      break
  return pose


def sample_betas(rng, num_betas=10, clip=2.5):
  """Adult shape: PCA coefficients ~ N(0, 1), clipped to +-clip."""
  return np.clip(rng.standard_normal(num_betas), -clip, clip)
