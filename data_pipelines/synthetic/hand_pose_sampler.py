"""Random right-hand MANO poses within finger joint limits, deterministic given a Generator.

MANO's 16 joints (kinematic order): wrist 0; index 1-3, middle 4-6, pinky 7-9,
ring 10-12, thumb 13-15, each finger from the knuckle outwards (MCP, PIP, DIP;
for the thumb CMC, MCP, IP). A joint's local rotation is sampled, as the body's
(`pose_sampler`), as intrinsic Euler angles R_local = Rx(flex) Rz(abd) Ry(twist)
in an anatomical frame A = [x y z] built from the rest pose of the hand's own
shape, and MANO's axis-angle of the joint is that of A R_local A^T (MANO's
rest pose has every joint frame aligned with the model axes):

  y  the bone, from the joint to the next joint (the last joint of a finger:
     to its fingertip), the twist axis;
  x  y x n, the flexion axis: a positive flexion turns the bone towards n;
  z  x x y = n made orthogonal to y, the abduction axis: a positive abduction
     turns the finger towards the little finger.

n is the palm normal (out of the palm) for the four fingers, computed from the
joints as (index1 - wrist) x (pinky1 - wrist), which points out of the palm of
any right hand whatever its axes; for the thumb it is the direction half way
between that normal and the line across the knuckles towards the little finger,
so that thumb flexion curls the thumb over the palm (opposition) rather than
into it.

Flexion at the MCP, PIP and DIP joints (and the thumb's MCP and IP) is measured
from the straight finger (`rest_flexion`): a rest mesh whose fingers are
already bent (the embedded hand's are, by up to 20 degrees) keeps the anatomical
limits. The thumb's CMC joint has no straight reference; its angles are from
the rest pose. Global orientation (joint 0) is uniform over the rotations
that show the palm or the back of the hand to the camera: the palm normal
within MAX_PALM_TILT_DEG of the viewing axis (as in FreiHAND's photographs,
where the fingers are seldom seen end on), and the hand's long axis (wrist to
middle knuckle) within MAX_ROLL_DEG of the image's up direction;
`max_palm_tilt=None, max_roll=None` draws from all rotations.

A pose is drawn from a small mixture: 'grasp' (one closing amount for the
hand, each finger near it: open hands, relaxed hands, fists and grips),
'gesture' (each finger either out or curled: pointing, counting, V signs) and
'uniform' (every angle independently uniform within its limits, so every limit
is reached). Poses whose fingers pass through each other or through the palm
are redrawn (`penetrates`).
"""

import numpy as np
from scipy.spatial.transform import Rotation

from data_pipelines.synthetic import pose_sampler

NUM_JOINTS = 16
# The 21 hand joints (hand_model.HAND_JOINT_NAMES): wrist 0, thumb 1-4,
# index 5-8, middle 9-12, ring 13-16, pinky 17-20.
WRIST = 0
FINGER_JOINTS_21 = {
    'thumb': (1, 2, 3, 4),
    'index': (5, 6, 7, 8),
    'middle': (9, 10, 11, 12),
    'ring': (13, 14, 15, 16),
    'pinky': (17, 18, 19, 20),
}
# MANO joints of each finger, knuckle outwards.
FINGER_JOINTS_MANO = {
    'index': (1, 2, 3),
    'middle': (4, 5, 6),
    'pinky': (7, 8, 9),
    'ring': (10, 11, 12),
    'thumb': (13, 14, 15),
}
FINGERS = ('thumb', 'index', 'middle', 'ring', 'pinky')

# Per MANO joint: (lo, hi) in degrees of the flexion (x), twist (y) and
# abduction (z) angles. Active ranges of motion of the adult hand (goniometry,
# e.g. the functional and full ranges in Hume et al. 1990 and the joint
# constraints of hand-tracking models, Lee & Kunii 1995):
#  * MCP: flexion to 90, hyperextension to 20; abduction in the palm plane,
#    widest for the index (towards the thumb) and the little finger (away
#    from the hand), little for the middle finger; almost no axial twist (5).
#  * PIP: a hinge, 0 to 105. DIP: a hinge, 0 to 80, with 5 of hyperextension.
#  * Thumb CMC (a saddle joint, from the rest pose): flexion across the palm
#    -20 to 40, abduction away from / towards the palm +-25, and the axial
#    pronation that comes with opposition, -15 to 25.
#  * Thumb MCP: flexion -10 to 60, a little side play (+-8). Thumb IP: a
#    hinge, -15 (the thumb's common hyperextension) to 80.
_MCP_FLEX, _PIP_FLEX, _DIP_FLEX = (-20.0, 90.0), (0.0, 105.0), (-5.0, 80.0)
_HINGE = (0.0, 0.0)
LIMITS_DEG = {
    1: (_MCP_FLEX, (-5.0, 5.0), (-20.0, 10.0)),  # index MCP
    2: (_PIP_FLEX, _HINGE, _HINGE),  # index PIP
    3: (_DIP_FLEX, _HINGE, _HINGE),  # index DIP
    4: (_MCP_FLEX, (-5.0, 5.0), (-10.0, 10.0)),  # middle MCP
    5: (_PIP_FLEX, _HINGE, _HINGE),
    6: (_DIP_FLEX, _HINGE, _HINGE),
    7: (_MCP_FLEX, (-5.0, 5.0), (-10.0, 25.0)),  # pinky MCP
    8: (_PIP_FLEX, _HINGE, _HINGE),
    9: (_DIP_FLEX, _HINGE, _HINGE),
    10: (_MCP_FLEX, (-5.0, 5.0), (-10.0, 15.0)),  # ring MCP
    11: (_PIP_FLEX, _HINGE, _HINGE),
    12: (_DIP_FLEX, _HINGE, _HINGE),
    13: ((-20.0, 40.0), (-15.0, 25.0), (-25.0, 25.0)),  # thumb CMC (from rest)
    14: ((-10.0, 60.0), _HINGE, (-8.0, 8.0)),  # thumb MCP
    15: ((-15.0, 80.0), _HINGE, _HINGE),  # thumb IP
}
# Joints whose flexion is measured from the straight finger (all but the CMC).
FROM_STRAIGHT = tuple(j for j in range(1, NUM_JOINTS) if j != 13)
# Largest angle (degrees) between the palm normal and the camera axis (either
# way): the palm or the back of the hand faces the camera.
MAX_PALM_TILT_DEG = 60.0
# Largest angle (degrees) in the image between the hand's long axis (wrist to
# middle knuckle) and the image's up direction: a hand held up in front of the
# camera. The network predicts vertices in camera axes, so it has to read the
# orientation before the articulation can lower its loss; at any roll, the
# embedded recipe's network stayed nearer the mean hand (docs/hand_recipe.md).
# Real-data recipes add METRO's rotation augmentation (rot_factor) to whatever
# the data shows.
MAX_ROLL_DEG = 60.0
MODES = ('grasp', 'gesture', 'uniform')
MODE_PROBS = (0.6, 0.2, 0.2)
# The DIP follows the PIP (the coupling of the two flexor tendons): about 2/3.
DIP_PER_PIP = 2.0 / 3.0
# MCP and PIP flexion of a closed fist: the palm stops the fingers before
# their joint limits (at the limits the fingertips would be inside the palm).
FIST_DEG = (70.0, 90.0)
# Finger penetration: the centre lines of two fingers closer than this (m) pass
# through each other (an adult finger is 15-20 mm thick; touching fingers are
# 15 mm apart or more); a finger point less than this above the palm plane,
# over the palm, is inside the palm.
MIN_FINGER_GAP = 0.012
MIN_PALM_HEIGHT = 0.01


def _unit(v):
  return v / np.linalg.norm(v)


def _mano_to_21():
  """{MANO joint: (its hand joint, the next hand joint, the previous hand joint)}."""
  out = {}
  for finger, mano in FINGER_JOINTS_MANO.items():
    k = FINGER_JOINTS_21[finger]
    prev = (WRIST,) + k[:3]
    for i, j in enumerate(mano):
      out[j] = (k[i], k[i + 1], prev[i])
  return out


MANO_TO_21 = _mano_to_21()


def palm_normal(rest21):
  """Unit normal out of the palm of a right hand [3] from its 21 joints."""
  return _unit(np.cross(rest21[5] - rest21[WRIST], rest21[17] - rest21[WRIST]))


def long_axis(rest21):
  """Unit axis [3] of a hand's length, from the wrist to the middle-finger knuckle."""
  return _unit(rest21[9] - rest21[WRIST])


def joint_frames(rest21):
  """[16, 3, 3] anatomical frames (columns x, y, z; module docstring) of a right hand."""
  rest21 = np.asarray(rest21, np.float64)
  n = palm_normal(rest21)
  across = _unit(rest21[17] - rest21[5])  # index knuckle -> little-finger knuckle
  n_thumb = _unit(n + across)
  frames = np.tile(np.eye(3), (NUM_JOINTS, 1, 1))
  for j, (k, child, _) in MANO_TO_21.items():
    y = _unit(rest21[child] - rest21[k])
    x = _unit(np.cross(y, n_thumb if j >= 13 else n))
    frames[j] = np.stack([x, y, np.cross(x, y)], axis=1)
  return frames


def rest_flexion(rest21, frames):
  """[16] flexion (degrees) of the rest pose, from the straight finger (0 for the CMC)."""
  rest21 = np.asarray(rest21, np.float64)
  flex = np.zeros(NUM_JOINTS)
  for j in FROM_STRAIGHT:
    k, _, prev = MANO_TO_21[j]
    x, y = frames[j][:, 0], frames[j][:, 1]
    u = rest21[k] - rest21[prev]  # the parent bone
    u = u - (u @ x) * x
    flex[j] = np.rad2deg(np.arctan2(x @ np.cross(u, y), u @ y))
  return flex


def angles_to_pose(rest21, angles, global_rotvec=(0.0, 0.0, 0.0)):
  """MANO pose [48] from per-joint angles [16, 3] (flex, twist, abd; row 0 unused)."""
  frames = joint_frames(rest21)
  flex0 = rest_flexion(rest21, frames)
  rot = np.empty((NUM_JOINTS, 3, 3))
  rot[0] = Rotation.from_rotvec(np.asarray(global_rotvec, np.float64)).as_matrix()
  for j in range(1, NUM_JOINTS):
    rot[j] = pose_sampler.local_to_rotmat(frames[j], angles[j], flex0[j])
  return Rotation.from_matrix(rot).as_rotvec().reshape(3 * NUM_JOINTS)


def pose_to_angles(rest21, pose):
  """Inverse of `angles_to_pose`: [16, 3] (flex, twist, abd) degrees; row 0 is 0."""
  frames = joint_frames(rest21)
  flex0 = rest_flexion(rest21, frames)
  rot = Rotation.from_rotvec(np.asarray(pose, np.float64).reshape(NUM_JOINTS, 3)).as_matrix()
  out = np.zeros((NUM_JOINTS, 3))
  for j in range(1, NUM_JOINTS):
    out[j] = pose_sampler.rotmat_to_local(frames[j], rot[j], flex0[j])
  return out


def _clip(j, axis, value):
  lo, hi = LIMITS_DEG[j][axis]
  return float(np.clip(value, lo, hi))


def _finger_angles(rng, j_mcp, curl, spread):
  """(MCP, PIP, DIP) angles [3, 3] of a finger closed by `curl` in [0, 1]."""
  _, twist, (abd_lo, abd_hi) = LIMITS_DEG[j_mcp]
  mcp = curl * FIST_DEG[0] + rng.normal(0.0, 8.0)
  pip = curl * FIST_DEG[1] + rng.normal(0.0, 8.0)
  pip = _clip(j_mcp + 1, 0, pip)
  dip = DIP_PER_PIP * pip + rng.normal(0.0, 6.0)
  # A closing finger comes towards its neighbours (spread in [-1, 1]).
  abd = (1.0 - 0.7 * curl) * (spread * (abd_hi if spread > 0 else -abd_lo))
  return np.array(
      [
          [_clip(j_mcp, 0, mcp), rng.uniform(*twist) * 0.5, _clip(j_mcp, 2, abd)],
          [pip, 0.0, 0.0],
          [_clip(j_mcp + 2, 0, dip), 0.0, 0.0],
      ]
  )


def _thumb_angles(rng, curl):
  """(CMC, MCP, IP) angles [3, 3] of a thumb closed by `curl` in [0, 1]."""
  cmc = [
      _clip(13, 0, -10.0 + 50.0 * curl + rng.normal(0.0, 8.0)),
      _clip(13, 1, 25.0 * curl + rng.normal(0.0, 6.0)),
      rng.uniform(*LIMITS_DEG[13][2]),
  ]
  mcp = [_clip(14, 0, 55.0 * curl + rng.normal(0.0, 8.0)), 0.0, rng.uniform(-4.0, 4.0)]
  ip = [_clip(15, 0, 70.0 * curl + rng.normal(0.0, 10.0)), 0.0, 0.0]
  return np.array([cmc, mcp, ip])


def sample_angles(rng):
  """[16, 3] joint angles (flex, twist, abd) in degrees of one mode of MODES; row 0 is 0."""
  mode = MODES[rng.choice(len(MODES), p=MODE_PROBS)]
  angles = np.zeros((NUM_JOINTS, 3))
  if mode == 'uniform':
    for j, limits in LIMITS_DEG.items():
      angles[j] = [rng.uniform(lo, hi) for lo, hi in limits]
    return angles
  if mode == 'grasp':
    closing = rng.uniform()
    curls = np.clip(closing + rng.normal(0.0, 0.2, len(FINGERS)), 0.0, 1.0)
  else:  # 'gesture': each finger out or curled
    curled = rng.uniform(size=len(FINGERS)) < 0.5
    curls = np.where(curled, rng.uniform(0.75, 1.0, 5), rng.uniform(0.0, 0.15, 5))
  spread = rng.uniform(-0.3, 1.0)  # the hand's spreading, shared by the fingers
  for finger, curl in zip(FINGERS, curls):
    mano = FINGER_JOINTS_MANO[finger]
    if finger == 'thumb':
      angles[list(mano)] = _thumb_angles(rng, curl)
    else:
      angles[list(mano)] = _finger_angles(rng, mano[0], curl, spread + rng.normal(0.0, 0.15))
  return angles


def roll_deg(rot, up):
  """Angle (degrees) in the image between the rotated axis `up` [3] and the image's up (-y)."""
  x, y = rot.apply(up)[:2]
  return float(np.degrees(np.arctan2(abs(x), -y)))


def sample_global_orientation(rng, palm=None, max_palm_tilt=None, up=None, max_roll=None):
  """A random global orientation, as an axis-angle [3].

  Uniform over all rotations (a normalised 4D Gaussian quaternion), restricted
  by rejection sampling: with the rest palm normal `palm` [3] and
  `max_palm_tilt` (degrees), to those that turn it to within that angle of the
  camera axis z or of -z; with the rest long axis `up` [3] and `max_roll`
  (degrees), to those that show it within that angle of the image's up
  direction (camera axes: x right, y down).
  """
  while True:
    q = rng.standard_normal(4)
    rot = Rotation.from_quat(q / np.linalg.norm(q))
    if max_palm_tilt is not None and abs(rot.apply(palm)[2]) < np.cos(np.radians(max_palm_tilt)):
      continue
    if max_roll is not None and roll_deg(rot, up) > max_roll:
      continue
    return rot.as_rotvec()


def _segment_points(a, b, n):
  t = np.linspace(0.0, 1.0, n)[:, None]
  return a + t * (b - a)


def penetrates(hand_joints):
  """Cheap test of a posed right hand's 21 joints [21, 3] for fingers through fingers or palm.

  Fingers are their centre lines from the middle of the proximal phalanx to
  the tip (the thumb from its MCP); two different fingers closer than
  MIN_FINGER_GAP, or a point of a finger's last two bones over the palm
  (across: between the index and little-finger knuckles; along: 15 to 95 %
  of the way from the wrist to them) less than MIN_PALM_HEIGHT above the
  plane of the wrist and those knuckles, fail. The palm's skin is 15-30 mm
  above that plane (the embedded hand), so the test only rejects fingers
  deep in the palm.
  """
  j = np.asarray(hand_joints, np.float64)
  lines = {}
  for finger, (k1, k2, k3, k4) in FINGER_JOINTS_21.items():
    start = j[k2] if finger == 'thumb' else 0.5 * (j[k1] + j[k2])
    lines[finger] = np.concatenate(
        [_segment_points(start, j[k2], 2), _segment_points(j[k2], j[k3], 4)[1:]]
        + [_segment_points(j[k3], j[k4], 4)[1:]]
    )
  names = list(lines)
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      d = np.linalg.norm(lines[names[a]][:, None] - lines[names[b]][None], axis=-1)
      if d.min() < MIN_FINGER_GAP:
        return True
  # Palm: the plane through the wrist, index and little-finger knuckles.
  w, i1, p1 = j[WRIST], j[5], j[17]
  n = _unit(np.cross(i1 - w, p1 - w))
  e1 = _unit(0.5 * (i1 + p1) - w)  # wrist -> knuckles
  e2 = np.cross(n, e1)
  corners = np.stack([w, i1, p1]) - w
  reach = corners @ e1
  side = corners @ e2
  for _, k2, k3, k4 in FINGER_JOINTS_21.values():
    pts = np.concatenate([_segment_points(j[k2], j[k3], 3), _segment_points(j[k3], j[k4], 4)])
    rel = pts - w
    height, along, across = rel @ n, rel @ e1, rel @ e2
    over = (along > 0.15 * reach.max()) & (along < 0.95 * reach.max())
    over &= (across > side.min()) & (across < side.max())
    if np.any(over & (height < MIN_PALM_HEIGHT)):
      return True
  return False


def sample_pose(
    rng,
    rest21,
    hand_joints_fn=None,
    max_tries=20,
    max_palm_tilt=MAX_PALM_TILT_DEG,
    max_roll=MAX_ROLL_DEG,
):
  """Samples a right-hand pose within the joint limits.

  Args:
    rng: numpy Generator (the only source of randomness).
    rest21: [21, 3] rest-pose hand joints of the hand's shape.
    hand_joints_fn: optional pose [48] -> posed 21 joints [21, 3]; when given,
      poses that `penetrates` are redrawn (after max_tries the last is kept).
    max_tries: draws before giving up on a penetration-free pose.
    max_palm_tilt: `sample_global_orientation`'s (None: any tilt).
    max_roll: `sample_global_orientation`'s, about the wrist -> middle
      knuckle axis (None: any roll).

  Returns:
    [48] MANO axis-angle pose (joint 0: the global orientation).
  """
  frames = joint_frames(rest21)
  flex0 = rest_flexion(rest21, frames)
  rot = np.empty((NUM_JOINTS, 3, 3))
  rot[0] = np.eye(3)
  for _ in range(max_tries):
    angles = sample_angles(rng)
    for j in range(1, NUM_JOINTS):
      rot[j] = pose_sampler.local_to_rotmat(frames[j], angles[j], flex0[j])
    pose = Rotation.from_matrix(rot).as_rotvec().reshape(3 * NUM_JOINTS)
    if hand_joints_fn is None or not penetrates(hand_joints_fn(pose)):
      break
  pose[:3] = sample_global_orientation(
      rng, palm_normal(rest21), max_palm_tilt, long_axis(rest21), max_roll
  )
  return pose


def sample_betas(rng, num_betas=10, clip=2.0):
  """Adult hand shape: PCA coefficients ~ N(0, 1), clipped to +-clip."""
  return np.clip(rng.standard_normal(num_betas), -clip, clip)
