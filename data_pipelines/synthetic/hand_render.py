"""Renders one synthetic hand example: a posed right or left hand over a random background.

The image is FreiHAND's kind of crop: the hand near the middle of a square
image, labelled as METRO's FreiHAND TSVs are (center = the image centre, scale
= 0.9 for a 224-px image, i.e. a crop box of 80 % of the side; pixel centres
at integers, so the centre of an S-px image is (S - 1) / 2). The hand's tight
box fills HAND_FRACTION of that crop box and its centre is up to
CENTRE_JITTER of the box off the image centre, so the hand is centred as in
FreiHAND but not exactly.

Camera: as the body's (render.py), a near-orthographic pinhole with a focal
length of 5000 px on the 224-px crop, principal point at the image centre, so
the network's weak-perspective camera explains the 2D joints of the crop to
within a fraction of a pixel.

Hands: the pose sampler draws a right-hand pose p; with probability
LEFT_FRACTION the example is a left hand: `hand_model.mirror` of the hand
driven by `mirror_pose(p)`, whose vertices are the right hand's (driven by p)
with x negated. The global orientation (palm or back towards the camera, fingers
up within hand_pose_sampler.MAX_ROLL_DEG; `sample_global_orientation`) is
already the camera-frame orientation (x right, y down, z forward).

Label (METRO's FreiHAND format, see data_pipelines/metro_labels.py): center,
scale, 2d_joints [21, 3] (projected joints in pixels, visibility 1 inside the
image), 3d_joints [21, 4] (the hand model's 21 joints in metres, camera axes,
without translation, confidence 1), pose [48] and betas [10] of the hand model
of the hand's side (has_smpl: the example has MANO parameters), and hand_type
('right' or 'left', InterHand2.6M's key): a left hand's pose drives
`hand_model.mirror(hand)`.
"""

import dataclasses

import cv2
import numpy as np
import scipy.sparse

from data_pipelines.synthetic import appearance
from data_pipelines.synthetic import hand_np
from data_pipelines.synthetic import hand_pose_sampler
from data_pipelines.synthetic import render

# METRO's FreiHAND labels: center (112, 112) and scale 0.9 on 224-px images.
FREIHAND_SIZE = 224
FREIHAND_SCALE = 0.9
HAND_FRACTION = (0.55, 0.95)  # hand tight-box side / crop-box side
CENTRE_JITTER = 0.08  # hand-box centre offset, fraction of the crop-box side
LEFT_FRACTION = 0.5
NUM_HAND_JOINTS = 21
CUFF_PROB = 0.35  # a sleeve or cuff over the wrist
# Hand skeleton on the contact sheet: (parent, child) per bone, one colour per finger.
HAND_BONES = tuple(
    (a, b)
    for k in hand_pose_sampler.FINGER_JOINTS_21.values()
    for a, b in zip((hand_pose_sampler.WRIST,) + k[:3], k)
)
FINGER_COLOURS = ((255, 80, 40), (255, 220, 40), (60, 220, 60), (40, 160, 255), (200, 80, 255))


@dataclasses.dataclass(frozen=True)
class HandAssets:
  """Everything a worker needs for hands: JAX-free, picklable."""

  right: hand_np.HandArrays
  left: hand_np.HandArrays
  faces: dict  # side -> [F, 3] faces wound so that face normals point outwards
  incidence: scipy.sparse.csr_matrix  # [V, F] vertex-face incidence (both sides)
  along: np.ndarray  # [V] rest position along the wrist -> middle knuckle axis (m)
  palm_side: np.ndarray  # [V] cosine of the rest normal with the palm normal


def _outward(verts, faces):
  v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
  volume = np.einsum('fi,fi->', v0, np.cross(v1, v2)) / 6.0
  return np.ascontiguousarray(faces if volume > 0 else faces[:, ::-1])


def make_assets(right, left):
  """HandAssets from the right hand's HandArrays and its mirror."""
  rest_v = right.v_template
  rest21 = right.rest_hand_joints(np.zeros(right.shapedirs.shape[-1]))
  faces = {side: _outward(h.v_template, h.faces) for side, h in (('right', right), ('left', left))}
  incidence = render.vertex_face_incidence(len(rest_v), faces['right'])
  normals = render.vertex_normals(render.face_normals(rest_v, faces['right']), incidence)
  axis = hand_pose_sampler.long_axis(rest21)
  return HandAssets(
      right=right,
      left=left,
      faces=faces,
      incidence=incidence,
      along=(rest_v - rest21[hand_pose_sampler.WRIST]) @ axis,
      palm_side=normals @ hand_pose_sampler.palm_normal(rest21),
  )


def vertex_albedo(rng, assets):
  """[V, 3] skin (a lighter palm), sometimes a sleeve or cuff over the wrist."""
  skin = appearance.SKIN_TONES[rng.integers(len(appearance.SKIN_TONES))] * rng.uniform(
      0.92, 1.05, 3
  )
  palm = np.clip(assets.palm_side, 0.0, 1.0)[:, None]  # palms are lighter, a little pinker
  albedo = skin * (1.0 + palm * np.array([0.1, 0.06, 0.06]))
  if rng.uniform() < CUFF_PROB:
    albedo[assets.along < rng.uniform(-0.005, 0.025)] = appearance.cloth_colour(rng)
  albedo = albedo * rng.uniform(0.95, 1.05, (len(albedo), 1))
  return np.clip(albedo, 0.0, 1.0)


def crop_box(size):
  """METRO's FreiHAND center [2] and scale of an S-px image, and the box side in px."""
  scale = FREIHAND_SCALE * size / FREIHAND_SIZE
  return np.full(2, (size - 1) / 2.0), scale, 200.0 * scale


def sample_camera(rng, verts, size):
  """Near-orthographic camera putting the hand near the image centre (module docstring)."""
  _, _, box_px = crop_box(size)
  lo, hi = verts[:, :2].min(0), verts[:, :2].max(0)
  k = rng.uniform(*HAND_FRACTION) * box_px / float((hi - lo).max())  # px per metre
  focal = render.FOCAL_CROP * box_px / render.CROP_SIZE
  offset = CENTRE_JITTER * box_px * rng.uniform(-1, 1, 2)
  principal = np.full(2, size / 2.0)
  txy = -0.5 * (lo + hi) + offset / k
  return render.Camera(focal=focal, principal=principal, trans=np.array([*txy, focal / k]))


def make_label(joints21, uv_joints, pose, betas, side, size):
  """METRO FreiHAND label dict (module docstring)."""
  center, scale, _ = crop_box(size)
  px = uv_joints - 0.5
  vis = np.all((px >= 0) & (px <= size - 1), axis=1).astype(np.float64)
  # Rounded far below what the labels resolve (render.make_label).
  fix = lambda x, decimals: np.round(np.asarray(x, np.float64), decimals).tolist()
  return {
      'center': fix(center, 4),
      'scale': fix(scale, 6),
      '2d_joints': fix(np.concatenate([px, vis[:, None]], 1), 4),
      'has_2d_joints': 1,
      '3d_joints': fix(np.concatenate([joints21, np.ones((len(joints21), 1))], 1), 6),
      'has_3d_joints': 1,
      'pose': fix(pose, 6),
      'betas': fix(betas, 6),
      'has_smpl': 1,
      'hand_type': side,
  }


def sample_hand(rng, assets):
  """(side, pose [48], betas [K]): the example's hand, before any rendering draw."""
  right = assets.right
  betas = hand_pose_sampler.sample_betas(rng, right.shapedirs.shape[-1])
  rest21 = right.rest_hand_joints(betas)
  joints_of = lambda p: hand_np.lbs(right, p, betas)[1]
  pose = hand_pose_sampler.sample_pose(rng, rest21, joints_of)
  if rng.uniform() < LEFT_FRACTION:
    return 'left', mirror_pose(pose), betas
  return 'right', pose, betas


def mirror_pose(pose):
  """Axis-angle pose [48] of the mirror image: (x, y, z) -> (x, -y, -z) (hand_model.mirror_pose)."""
  return (np.asarray(pose, np.float64).reshape(-1, 3) * [1.0, -1.0, -1.0]).reshape(-1)


def render_example(assets, rng, size, backend='auto'):
  """Samples and renders one hand example.

  Args:
    assets: `make_assets(...)`.
    rng: numpy Generator; the example is a deterministic function of it.
    size: square image side in px.
    backend: rasterizer backend; the image does not depend on it.

  Returns:
    dict: image [S, S, 3] uint8 RGB, label (METRO dict), face_id [S, S] int32
    (-1 background), vertices [V, 3] camera frame with translation, joints
    [21, 3] camera frame with translation, camera, side.
  """
  side, pose, betas = sample_hand(rng, assets)
  hand = assets.left if side == 'left' else assets.right
  faces = assets.faces[side]
  verts, joints21 = hand_np.lbs(hand, pose, betas)  # camera axes, no translation
  cam = sample_camera(rng, verts, size)
  uv, depth = render.project(verts, cam)
  verts_cam = verts + cam.trans
  normals_f = render.face_normals(verts_cam, faces)
  face_id = render.rasterize_mesh(verts_cam, faces, normals_f, uv, depth, size, size, backend)
  albedo = vertex_albedo(rng, assets)
  normals = render.vertex_normals(normals_f, assets.incidence)
  pix, colour = render.shade(rng, face_id, faces, uv, normals, albedo)
  img = appearance.background(rng, size, size).reshape(-1, 3)
  img[pix] = colour
  img = img.reshape(size, size, 3)
  blur = rng.uniform(0.0, 0.9)
  if blur > 0.3:  # Softens the aliased silhouette like a camera lens.
    img = cv2.GaussianBlur(img, (0, 0), blur)
  img += render.sensor_noise(rng, img.shape, rng.uniform(0.0, 0.03))
  image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  uv_j, _ = render.project(joints21, cam)
  return {
      'image': image,
      'label': make_label(joints21, uv_j, pose, betas, side, size),
      'face_id': face_id,
      'vertices': verts_cam,
      'joints': joints21 + cam.trans,
      'camera': cam,
      'side': side,
  }


def draw_joints(image, joints_2d):
  """Copy of an RGB image with the 21-joint hand skeleton drawn on it."""
  img = np.ascontiguousarray(image).copy()
  scale = max(1, round(img.shape[0] / 256))
  j = np.asarray(joints_2d)
  point = lambda i: tuple(int(round(v)) for v in j[i, :2])
  for n, (a, b) in enumerate(HAND_BONES):
    if j[a, 2] > 0 and j[b, 2] > 0:
      cv2.line(img, point(a), point(b), FINGER_COLOURS[n // 4], scale, cv2.LINE_AA)
  for i in range(len(j)):
    if j[i, 2] > 0:
      cv2.circle(img, point(i), scale + 1, (255, 255, 255), -1, cv2.LINE_AA)
  return img
