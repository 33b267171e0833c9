"""Pictures of predicted meshes: overlays, side views, heat maps (NumPy + OpenCV).

No JAX and no TensorFlow here: training (`train._write_pictures`), inference
(`coarsemetro_jax.infer`) and the attention maps call these on host arrays.

Camera convention (FastMETRO/METRO): x right, y down, z forward; weak
perspective pred_cam = (s, tx, ty) maps a vertex X to s * (X[:2] + [tx, ty])
in normalised crop coordinates, where -1 and 1 are the crop borders, i.e. the
continuous pixel coordinate is (x2d + 1) * S / 2 (`image_ops`). Meshes are
drawn with the z-buffer `rasterizer` (nearest triangle per pixel centre; the
synthetic data is rendered with it too) and flat Lambertian shading.
"""

import os

import cv2
import numpy as np

from coarsemetro_jax import image_ops
from coarsemetro_jax import rasterizer

MESH_COLOR = np.array([0.63, 0.74, 0.92])  # light blue, RGB in [0, 1]
MESH_ALPHA = 0.85  # mesh over the image
AMBIENT = 0.3
# Towards the viewer (-z) and a little from the upper left, in camera frame.
LIGHT_DIR = np.array([-0.3, -0.4, -1.0]) / np.linalg.norm([-0.3, -0.4, -1.0])
SIDE_VIEW_DEGREES = 90.0  # turn about the vertical axis
SIDE_BACKGROUND = 255  # white, as METRO's side view
HEAT_ALPHA = 0.5  # heat map over the image


def denormalize(images):
  """ImageNet-normalised float [N, H, W, 3] -> uint8 RGB [N, H, W, 3]."""
  images = np.asarray(images, np.float32)
  rgb = images * np.float32(image_ops.IMAGENET_STD) + np.float32(image_ops.IMAGENET_MEAN)
  return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def project(vertices, cam, size):
  """Weak-perspective projection to crop pixels. [V, 3], [3] -> [V, 2]."""
  vertices = np.asarray(vertices, np.float64)
  s, tx, ty = np.asarray(cam, np.float64)
  xy = s * (vertices[:, :2] + np.array([tx, ty]))  # [V, 2] in [-1, 1]
  return (xy + 1.0) * (size / 2.0)


def rasterize_mesh(vertices, cam, faces, size):
  """Face ids [S, S] (-1 = background) and per-face shade [F] in [0, 1]."""
  vertices = np.asarray(vertices, np.float64)
  faces = np.asarray(faces, np.int64)
  tri = vertices[faces]  # [F, 3, 3]
  tri_xy = project(vertices, cam, size)[faces]  # [F, 3, 2]
  _, face_id = rasterizer.rasterize(tri_xy, tri[..., 2], size, size)
  normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # [F, 3]
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
  # |n . l|: lit from the viewer's side whatever the winding.
  shade = AMBIENT + (1.0 - AMBIENT) * np.abs(normals @ LIGHT_DIR)  # [F]
  return face_id, shade


def render_mesh(vertices, cam, faces, background):
  """The mesh drawn over `background` (uint8 [S, S, 3]); returns uint8 [S, S, 3]."""
  background = np.asarray(background, np.uint8)
  size = background.shape[0]
  if background.shape[:2] != (size, size):
    raise ValueError(f'render_mesh needs a square crop, got {background.shape}')
  face_id, shade = rasterize_mesh(vertices, cam, faces, size)
  covered = face_id >= 0  # [S, S]
  colour = shade[face_id[covered], None] * MESH_COLOR * 255.0  # [n, 3]
  out = background.astype(np.float64)
  out[covered] = MESH_ALPHA * colour + (1.0 - MESH_ALPHA) * out[covered]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def rotate_about_vertical(vertices, degrees):
  """Turns the mesh about the camera's y axis through its centroid. [V, 3]."""
  vertices = np.asarray(vertices, np.float64)
  a = np.deg2rad(degrees)
  rot = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
  centre = vertices.mean(0)
  return (vertices - centre) @ rot.T + centre


def side_view(vertices, cam, faces, size):
  """The mesh turned by SIDE_VIEW_DEGREES, same camera, on a plain background."""
  background = np.full((size, size, 3), SIDE_BACKGROUND, np.uint8)
  return render_mesh(rotate_about_vertical(vertices, SIDE_VIEW_DEGREES), cam, faces, background)


def prediction_row(image, vertices, cam, faces):
  """[S, 3S, 3]: input crop | mesh overlay | side view."""
  image = np.asarray(image, np.uint8)
  size = image.shape[0]
  return np.concatenate(
      [image, render_mesh(vertices, cam, faces, image), side_view(vertices, cam, faces, size)],
      axis=1,
  )


def prediction_grid(images, pred_vertices, pred_cam, faces):
  """One row per example (input | overlay | side view). Returns uint8 [N*S, 3S, 3].

  Args:
    images: uint8 [N, S, S, 3] RGB crops (`denormalize` of the batch).
    pred_vertices: [N, V, 3] camera-frame vertices, pelvis-centred.
    pred_cam: [N, 3] weak-perspective (s, tx, ty).
    faces: int [F, 3] (topology.faces[0] for the 6890-vertex mesh).
  """
  images = np.asarray(images)
  pred_vertices, pred_cam = np.asarray(pred_vertices), np.asarray(pred_cam)
  if not len(images) == len(pred_vertices) == len(pred_cam):
    raise ValueError(
        f'prediction_grid: {len(images)} images, {len(pred_vertices)} '
        f'meshes and {len(pred_cam)} cameras; expected equal counts'
    )
  if not len(images):
    raise ValueError('prediction_grid: no images')
  return np.concatenate(
      [prediction_row(i, v, c, faces) for i, v, c in zip(images, pred_vertices, pred_cam)], axis=0
  )


def heat_overlay(image, heat):
  """A token-grid heat map [h, w] up-sampled to the crop and blended over it.

  The map is scaled to [0, 1] by its minimum and maximum (every panel uses the
  whole colour range) and up-sampled bicubically, as the paper's Figs. 5-7.
  """
  image = np.asarray(image, np.uint8)
  heat = np.asarray(heat, np.float32)
  heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
  up = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
  up = np.clip(up, 0.0, 1.0)
  colour = cv2.applyColorMap(np.rint(up * 255).astype(np.uint8), cv2.COLORMAP_JET)
  colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
  out = HEAT_ALPHA * colour + (1.0 - HEAT_ALPHA) * image.astype(np.float32)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def label(image, text):
  """Copy of `image` with `text` in the top-left corner (white on a dark edge)."""
  out = np.ascontiguousarray(np.asarray(image, np.uint8).copy())
  scale = max(0.3, out.shape[0] / 600.0)
  org = (2, int(12 * scale / 0.35))
  for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
  return out


def tile(rows):
  """Lists of equally sized uint8 cells -> one uint8 image (rows x columns).

  Short rows are padded with black cells.
  """
  width = max(len(r) for r in rows)
  blank = np.zeros_like(rows[0][0])
  return np.concatenate(
      [np.concatenate(list(r) + [blank] * (width - len(r)), axis=1) for r in rows], axis=0
  )


def save_png(path, image):
  """Writes uint8 RGB [H, W, 3] (or [H, W]) as PNG, creating the folder."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'save_png({path}): expected uint8, got {image.dtype}')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
  if not cv2.imwrite(path, bgr):
    raise OSError(f'could not write PNG {path}')
  return path
