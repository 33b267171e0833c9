"""Renders one synthetic example: a posed, dressed body over a random background.

Camera (SPIN/METRO): a near-orthographic pinhole whose focal length is 5000 px
on the 224-px crop of the person box, i.e. f_img = 5000 * box_px / 224 in image
pixels, at depth t_z = f_img / k for k image pixels per metre, with the
person's box centre on the optical axis. The network's weak-perspective camera
(s, tx, ty) then explains the 2D joints of the crop to within a crop pixel.
The camera frame is x right, y down, z forward; the body's rest frame is Y up,
face +Z, so the global orientation written to the label is R_FLIP @ R_body
(R_FLIP = 180 degrees about x): the label's (pose, betas) give the rendered
body, root-free, in camera axes.

Label (METRO, see data_pipelines/metro_tsv.py): center / scale from the tight
box of the projected mesh (scale = 1.2 * max side / 200, as METRO's 3DPW/UP-3D
generators), 2D joints = projected J24 joints in pixels (pixel centres at
integers), 3D joints = J24 joints in camera axes without translation (metres),
pose with the camera-frame global orientation, betas.
"""

import dataclasses

import cv2
import numpy as np
import scipy.sparse

from coarsemetro_jax import rasterizer
from data_pipelines.synthetic import appearance
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import pose_sampler

FOCAL_CROP = 5000.0  # px, on the CROP_SIZE crop (SPIN/METRO).
CROP_SIZE = 224
BOX_FACTOR = 1.2  # METRO's person box: 1.2 x the tight box.
R_FLIP = np.diag([1.0, -1.0, -1.0])  # Body frame (Y up) -> camera frame (y down).
# Fraction of the image side taken by the person's tight box, and how far (as a
# fraction of the free margin) its centre may move off the image centre.
PERSON_FRACTION = (0.55, 0.9)
OFFSET_FRACTION = 1.1


@dataclasses.dataclass(frozen=True)
class Assets:
  """Everything a worker needs: JAX-free, picklable."""

  body: body_np.BodyArrays
  parts: appearance.VertexParts
  faces: np.ndarray  # [F, 3] faces wound so that face normals point outwards
  incidence: scipy.sparse.csr_matrix  # [V, F] vertex-face incidence


def make_assets(body):
  """Assets from BodyArrays (rest mesh of the mean shape dresses the body)."""
  rest_v = body.v_template
  rest_j = body.regress('j_regressor', rest_v)
  faces = np.asarray(body.faces, np.int64)
  v0, v1, v2 = (rest_v[faces[:, i]] for i in range(3))
  volume = np.einsum('fi,fi->', v0, np.cross(v1, v2)) / 6.0
  if volume < 0:  # Inward-wound faces: flip so front faces are detected.
    faces = faces[:, ::-1]
  return Assets(
      body=body,
      parts=appearance.vertex_parts(rest_v, rest_j, body.weights),
      faces=np.ascontiguousarray(faces),
      incidence=vertex_face_incidence(len(rest_v), faces),
  )


def to_camera_pose(pose):
  """Body-frame pose [72] -> pose whose global orientation is in camera axes."""
  pose = np.array(pose, np.float64)
  pose[:3] = body_np.matrix_to_rotvec(R_FLIP @ body_np.rotvec_to_matrix(pose[:3]))
  return pose


@dataclasses.dataclass(frozen=True)
class Camera:
  focal: float  # image px
  principal: np.ndarray  # [2] image px (continuous coordinates)
  trans: np.ndarray  # [3] metres, added to the root-free body


def project(points, cam):
  """[N, 3] camera-axes points (before translation) -> uv [N, 2] px, depth [N].

  uv are continuous image coordinates: pixel (x, y) covers [x, x+1) x [y, y+1).
  """
  p = points + cam.trans
  return cam.focal * p[:, :2] / p[:, 2:] + cam.principal, p[:, 2]


def sample_camera(rng, verts, height, width):
  """Random placement: person size and offset in the image, near-orthographic.

  The person's box centre is on the optical axis (principal point = box
  centre, as a crop of a larger photo; SPIN renders its crops this way), so
  the weak-perspective camera of the crop is off only by the depth effect of
  f = 5000 (a fraction of a crop pixel).
  """
  lo, hi = verts[:, :2].min(0), verts[:, :2].max(0)
  side_m = float((hi - lo).max())
  size = min(height, width)
  frac = rng.uniform(*PERSON_FRACTION)
  k = frac * size / side_m  # image px per metre at the body's depth
  box_px = BOX_FACTOR * frac * size
  focal = FOCAL_CROP * box_px / CROP_SIZE
  margin = np.array([width, height]) - (hi - lo) * k
  centre = np.array([width / 2.0, height / 2.0])
  centre = centre + 0.5 * OFFSET_FRACTION * margin * rng.uniform(-1, 1, 2)
  txy = -0.5 * (lo + hi)
  return Camera(focal=focal, principal=centre, trans=np.array([*txy, focal / k]))


def vertex_face_incidence(num_vertices, faces):
  """Sparse [V, F] 0/1 matrix: vertex normals are incidence @ face normals."""
  rows = faces.reshape(-1)
  cols = np.repeat(np.arange(len(faces)), 3)
  return scipy.sparse.csr_matrix(
      (np.ones(len(rows)), (rows, cols)), shape=(num_vertices, len(faces))
  )


def face_normals(verts, faces):
  """[F, 3] face normals, length = 2 x area (outwards for outward winding)."""
  a = verts[faces[:, 0]]
  return np.cross(verts[faces[:, 1]] - a, verts[faces[:, 2]] - a)


def vertex_normals(normals_f, incidence):
  """[V, 3] area-weighted unit vertex normals from face normals [F, 3]."""
  vn = incidence @ normals_f
  return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def rasterize_mesh(verts_cam, faces, normals_f, uv, depth, height, width, backend='auto'):
  """Face-id buffer [H, W] (index into `faces`, -1 background) of front faces."""
  # The camera sits at the origin: a face is front-facing when its outward
  # normal points back towards it.
  front = np.nonzero(np.einsum('fi,fi->f', normals_f, verts_cam[faces[:, 0]]) < 0)[0]
  f = faces[front]
  _, fid = rasterizer.rasterize(uv[f], depth[f], height, width, backend)
  return np.where(fid >= 0, front[np.maximum(fid, 0)], -1).astype(np.int32)


def barycentrics(face_id, faces, uv):
  """Pixel indices [P] of the foreground and their barycentric weights [P, 3]."""
  pix = np.flatnonzero(face_id >= 0)
  width = face_id.shape[1]
  py, px = np.divmod(pix, width)
  t = uv[faces[face_id.reshape(-1)[pix]]]  # [P, 3, 2]
  (ax, ay), (bx, by), (cx, cy) = t[:, 0].T, t[:, 1].T, t[:, 2].T
  px, py = px + 0.5, py + 0.5
  den = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
  w0 = ((by - cy) * (px - cx) + (cx - bx) * (py - cy)) / den
  w1 = ((cy - ay) * (px - cx) + (ax - cx) * (py - cy)) / den
  return pix, np.stack([w0, w1, 1.0 - w0 - w1], axis=1)


def shade(rng, face_id, faces, uv, normals, albedo):
  """Foreground pixels [P] and their colours [P, 3]: Lambert + ambient.

  normals: [V, 3] unit vertex normals (camera axes), interpolated per pixel.
  """
  pix, w = barycentrics(face_id, faces, uv)
  tri = faces[face_id.reshape(-1)[pix]]  # [P, 3]
  n = np.einsum('pk,pki->pi', w, normals[tri])
  n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
  # Light from the camera's side of the body, mostly from above (y is down).
  light = np.array([rng.uniform(-1, 1), rng.uniform(-1.2, 0.3), -rng.uniform(0.3, 1.2)])
  light /= np.linalg.norm(light)
  ambient, diffuse = rng.uniform(0.25, 0.5), rng.uniform(0.5, 0.85)
  intensity = ambient + diffuse * np.clip(np.einsum('pi,i->p', n, light), 0.0, None)
  colour = np.einsum('pk,pki->pi', w, albedo[tri]) * intensity[:, None]
  return pix, colour


def make_label(j24, conf, uv_j, cam_verts_uv, pose_cam, betas, height, width):
  """METRO label dict (module docstring)."""
  lo, hi = cam_verts_uv.min(0), cam_verts_uv.max(0)
  center = 0.5 * (lo + hi) - 0.5  # pixel centres at integers
  px = uv_j - 0.5
  inside = (px[:, 0] >= 0) & (px[:, 0] <= width - 1) & (px[:, 1] >= 0) & (px[:, 1] <= height - 1)
  vis = (inside & (conf > 0)).astype(np.float64)
  # Rounded far below what the labels resolve (1e-4 px, 1e-6 m, 1e-6 rad):
  # the label file is less than half the size of full float64 digits.
  fix = lambda x, decimals: np.round(np.asarray(x, np.float64), decimals).tolist()
  return {
      'center': fix(center, 4),
      'scale': fix(BOX_FACTOR * (hi - lo).max() / 200.0, 6),
      '2d_joints': fix(np.concatenate([px, vis[:, None]], 1), 4),
      'has_2d_joints': 1,
      '3d_joints': fix(np.concatenate([j24, conf[:, None]], 1), 6),
      'has_3d_joints': 1,
      'pose': fix(pose_cam, 6),
      'betas': fix(betas, 6),
      'has_smpl': 1,
  }


def render_example(assets, rng, height, width, backend='auto'):
  """Samples and renders one example.

  Args:
    assets: `make_assets(...)`.
    rng: numpy Generator; the example is a deterministic function of it.
    height, width: image size.
    backend: rasterizer backend ('auto', 'numba', 'numpy'); the image does not
      depend on it.

  Returns:
    dict: image [H, W, 3] uint8 RGB, label (METRO dict), face_id [H, W] int32
    (-1 background), vertices [V, 3] camera frame with translation, camera.
  """
  body = assets.body
  betas = pose_sampler.sample_betas(rng, body.shapedirs.shape[-1])
  pose = to_camera_pose(pose_sampler.sample_pose(rng, body.rest_joints(betas)))
  verts, _ = body_np.lbs(body, pose, betas)  # [V, 3] camera axes, root-free
  j24 = body.regress('j24_regressor', verts)  # [24, 3]
  cam = sample_camera(rng, verts, height, width)
  uv, depth = project(verts, cam)
  verts_cam = verts + cam.trans
  normals_f = face_normals(verts_cam, assets.faces)
  face_id = rasterize_mesh(verts_cam, assets.faces, normals_f, uv, depth, height, width, backend)
  albedo = appearance.vertex_albedo(rng, assets.parts)
  normals = vertex_normals(normals_f, assets.incidence)
  pix, colour = shade(rng, face_id, assets.faces, uv, normals, albedo)
  img = appearance.background(rng, height, width).reshape(-1, 3)
  img[pix] = colour
  img = img.reshape(height, width, 3)
  blur = rng.uniform(0.0, 0.9)
  if blur > 0.3:  # Softens the aliased silhouette like a camera lens.
    img = cv2.GaussianBlur(img, (0, 0), blur)
  img += sensor_noise(rng, img.shape, rng.uniform(0.0, 0.03))
  image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  uv_j, _ = project(j24, cam)
  label = make_label(j24, body.j24_conf, uv_j, uv, pose, betas, height, width)
  return {'image': image, 'label': label, 'face_id': face_id, 'vertices': verts_cam, 'camera': cam}


def sensor_noise(rng, shape, std):
  """Zero-mean uniform pixel noise of standard deviation `std` (float32).

  Uniform bytes are 10x cheaper to draw than Gaussians, and after the JPEG
  round trip the two are indistinguishable.
  """
  u = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
  return (u.astype(np.float32) - np.float32(127.5)) * np.float32(std * np.sqrt(12.0) / 256.0)


def encode_jpeg(image, quality):
  """RGB uint8 image -> JPEG bytes."""
  ok, buf = cv2.imencode('.jpg', image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise RuntimeError('cv2.imencode failed to encode a JPEG')
  return buf.tobytes()
