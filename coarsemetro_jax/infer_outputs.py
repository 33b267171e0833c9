"""What `infer` writes per image: the mesh as .obj / .ply, a JSON record and pictures.

The JSON holds the camera, the joints in 3D, in the crop and in image pixels,
the mesh files' frame and origin, and with FastMETRO's SMPL-parameter head the
SMPL pose (axis-angle and rotation matrices) and betas.
"""

import json
import os

import numpy as np

from coarsemetro_jax import attention_maps
from coarsemetro_jax import hand_model
from coarsemetro_jax import image_crops
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import mesh_io
from coarsemetro_jax import visualize

MESH_FRAME = 'camera frame: x right, y down, z forward; metres'


def output_stem(path, used):
  """File name without extension, made unique among `used` (updated)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  name, k = stem, 1
  while name in used:
    name, k = f'{stem}_{k}', k + 1
  used.add(name)
  return name


def rotmat_to_axis_angle(rotmats):
  """Rotation matrices [..., 3, 3] -> axis-angle vectors [..., 3] (float64), angle in [0, pi].

  theta = atan2(|w|, (tr R - 1) / 2) with w = vee(R - R^T) / 2 = sin(theta) u.
  For theta < pi/2 the vector is theta / sin(theta) * w (the ratio from its
  series near 0, so the identity gives 0 and tiny angles keep their
  precision). Near pi, w vanishes and carries no direction: the axis comes
  from the symmetric part, (R + R^T) / 2 - cos(theta) I = (1 - cos(theta))
  u u^T, its largest column normalised, signed to agree with w (at exactly pi
  either sign is the same rotation).
  """
  r = np.asarray(rotmats, np.float64)
  w = 0.5 * np.stack(
      [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1
  )  # sin(theta) u
  sin = np.linalg.norm(w, axis=-1)
  cos = 0.5 * (np.trace(r, axis1=-2, axis2=-1) - 1.0)
  theta = np.arctan2(sin, cos)
  tiny = theta < 1e-4
  ratio = np.where(
      tiny, 1.0 + theta**2 / 6.0, theta / np.where(tiny, 1.0, np.sin(theta))
  )  # theta / sin(theta)
  small = ratio[..., None] * w
  sym = 0.5 * (r + np.swapaxes(r, -1, -2)) - cos[..., None, None] * np.eye(3)
  diag = np.diagonal(sym, axis1=-2, axis2=-1)  # (1 - cos) u_k^2
  k = np.argmax(diag, -1)
  column = np.take_along_axis(sym, k[..., None, None], -1)[..., 0]  # (1 - cos) u_k u
  norm = np.sqrt(
      np.maximum(np.take_along_axis(diag, k[..., None], -1) * (1.0 - cos)[..., None], 0.0)
  )  # (1 - cos) |u_k|
  axis = column / np.where(norm > 0, norm, 1.0)  # (0 only near theta = 0: not used there)
  axis *= np.where(np.sum(axis * w, -1, keepdims=True) < 0, -1.0, 1.0)
  large = theta[..., None] * axis
  return np.where((theta < np.pi / 2)[..., None], small, large)


def smpl_param_record(pred):
  """The JSON entry of the SMPL-parameter head's pose and shape (None without the head)."""
  if 'pred_rotmat' not in pred:
    return None
  rotmat = np.asarray(pred['pred_rotmat'], np.float64)  # [24, 3, 3]
  return {
      'pose_axis_angle': rotmat_to_axis_angle(rotmat).tolist(),  # [24, 3]
      'pose_rotmat': rotmat.tolist(),
      'betas': np.asarray(pred['pred_betas'], np.float64).tolist(),  # [10]
      'joints': 'the 24 SMPL joints, root (global orientation) first; pose_axis_angle '
      'is the 72-value SMPL pose',
  }


def write_outputs(out_dir, stem, crop, pred, faces, attention=None, centred=True, hand=False):
  """Mesh files, JSON, picture (and attention panel) of one image (`hand`: a hand's)."""
  base = os.path.join(out_dir, stem)
  comment = f"CoarseMETRO {'hand ' if hand else ''}mesh, {MESH_FRAME}"
  mesh_io.write_obj(base + '.obj', pred['pred_vertices'], faces, comment)
  mesh_io.write_ply(base + '.ply', pred['pred_vertices'], faces, comment)
  visualize.save_png(
      base + '.png',
      visualize.prediction_row(crop.pixels, pred['pred_vertices'], pred['pred_cam'], faces),
  )
  if attention is not None:
    visualize.save_png(
        base + '_attention.png', attention_maps.figure(crop.pixels, pred['attention'], attention)
    )
  s, tx, ty = (float(v) for v in pred['pred_cam'])
  record = {
      'image': crop.path,
      'image_size': list(crop.image_size),
      'bbox': None if crop.bbox is None else list(crop.bbox),
      'crop': {'center': list(crop.center), 'side': crop.side, 'size': int(crop.pixels.shape[0])},
      'camera': {
          's': s,
          'tx': tx,
          'ty': ty,
          'model': 'weak perspective: x2d = s * (X[:2] + [tx, ty]) in [-1, 1] ' 'crop coordinates',
      },
      'joint_names': list(hand_model.HAND_JOINT_NAMES if hand else joint_tables.J14_NAMES),
      'joints_3d': np.asarray(pred['pred_3d_joints']).tolist(),
      'joints_2d_crop': np.asarray(pred['pred_2d_joints']).tolist(),
      'joints_2d_image': image_crops.crop_to_image(pred['pred_2d_joints'], crop).tolist(),
      'mesh': {
          'obj': stem + '.obj',
          'ply': stem + '.ply',
          'vertices': int(len(pred['pred_vertices'])),
          'faces': int(len(faces)),
          'frame': MESH_FRAME,
          'origin': _mesh_origin(centred, hand),
      },
      'notes': crop.notes,
  }
  smpl = smpl_param_record(pred)
  if smpl is not None:
    record['smpl'] = smpl
  with open(base + '.json', 'w') as f:  # one key per line, arrays on one line
    f.write(
        '{\n'
        + ',\n'.join(f' {json.dumps(k)}: {json.dumps(v)}' for k, v in record.items())
        + '\n}\n'
    )


def _mesh_origin(centred, hand):
  if hand:
    return 'wrist of the hand joints regressed from the mesh'
  return 'H36M pelvis of the mesh' if centred else 'model output (no body model: not centred)'
