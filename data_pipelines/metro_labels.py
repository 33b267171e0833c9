"""METRO label records: parsing, validation and encoding (pure Python/NumPy).

The label column of `{split}.label.tsv` (data_pipelines/metro_tsv.py) holds a
JSON list whose first dict is the image's label; all joints are in the J24
order of `joints.J24_NAMES`:
  center [2] px, scale (box side / 200 px), 2d_joints [24, 3] (or [1, 24, 3]) px
  with a visibility column, 3d_joints [24, 4] (or [1, 24, 4]) metres in the
  camera frame with a confidence column, pose [72] SMPL axis-angle, betas [10],
  has_2d_joints / has_3d_joints / has_smpl in {0, 1}, optional gender (unused).

A hand label (`hand=True`, METRO's FreiHAND TSVs) has the same keys with the
21 hand joints of `hand_model.HAND_JOINT_NAMES` (wrist, thumb 1-4, index 1-4,
middle 1-4, ring 1-4, pinky 1-4): 2d_joints [21, 3], 3d_joints [21, 4], pose
[48] and betas [10] of MANO (has_smpl: the label has MANO parameters), plus
an optional hand_type, 'right' (FreiHAND's hands, the default) or 'left'
(InterHand2.6M's key): a left hand's pose and betas drive the mirrored hand
model (`hand_model.mirror`). It parses to the same arrays with those shapes
plus is_left [] (float32, 1 for a left hand).

`parse_label` turns it into the arrays of a batch; `encode_label`
validates one before a writer stores it; both raise ValueError naming the
field. `BadRowError` is the error the readers (metro_tsv, tfds_metro, the input
pipeline) raise for one unusable row, a label that does not parse included; the
input pipeline counts, logs and skips those rows.
"""

import json

import numpy as np

from coarsemetro_jax import joints

NUM_J24 = len(joints.J24_NAMES)
NUM_POSE = 3 * joints.NUM_SMPL_JOINTS
NUM_BETAS = joints.NUM_BETAS
# FreiHAND's 21 hand joints and MANO's 16 joints x 3 (hand_model).
NUM_HAND_JOINTS = 21
NUM_HAND_POSE = 48
HAND_TYPES = ('right', 'left')
# The crop's inputs keep the JSON's float64 values: the official crop
# (data_pipelines/metro_crop.py) truncates box corners and keypoints to
# integers, and float32 rounding moves some of them across an integer.
FLOAT64_FIELDS = ('center', 'scale', 'joints_2d')
# (label field, has_* flag, shape, parsed name) of the optional label fields.
_OPTIONAL_FIELDS = (
    ('2d_joints', 'has_2d_joints', (NUM_J24, 3), 'joints_2d'),
    ('3d_joints', 'has_3d_joints', (NUM_J24, 4), 'joints_3d'),
    ('pose', 'has_smpl', (NUM_POSE,), 'pose'),
    ('betas', 'has_smpl', (NUM_BETAS,), 'betas'),
)
_HAND_OPTIONAL_FIELDS = (
    ('2d_joints', 'has_2d_joints', (NUM_HAND_JOINTS, 3), 'joints_2d'),
    ('3d_joints', 'has_3d_joints', (NUM_HAND_JOINTS, 4), 'joints_3d'),
    ('pose', 'has_smpl', (NUM_HAND_POSE,), 'pose'),
    ('betas', 'has_smpl', (NUM_BETAS,), 'betas'),
)
# Every key METRO's reader indexes (gender is optional).
_LABEL_KEYS = (
    'center',
    'scale',
    '2d_joints',
    '3d_joints',
    'has_2d_joints',
    'has_3d_joints',
    'pose',
    'betas',
    'has_smpl',
)


class BadRowError(ValueError):
  """One row of a dataset cannot be used; the message names file and row."""


# ------------------------------------------------------------------- labels


def _flag(label, name):
  """A has_* flag as 0.0 / 1.0; missing -> 0 (that supervision is unused)."""
  value = label.get(name, 0)
  if isinstance(value, (list, tuple)):  # some writers store [1]
    value = value[0] if len(value) == 1 else None
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = None
  if value not in (0.0, 1.0):
    raise ValueError(f'{name} must be 0 or 1, got {label.get(name)!r}')
  return value


def _field(label, name, shape):
  """A label array of `shape` (float64), squeezing a leading 1 as METRO does."""
  value = np.asarray(label[name], dtype=np.float64)
  if value.ndim == len(shape) + 1 and value.shape[0] == 1:
    value = value[0]
  if len(shape) == 1 and value.size == shape[0]:
    value = value.reshape(shape)
  if value.shape != shape:
    raise ValueError(f'{name} has shape {value.shape}, expected {shape}')
  return value


def parse_label(label, hand=False):
  """Parses one METRO label dict into the arrays of a batch (hand=True: a hand label).

  `center` and `scale` are required and must be finite (scale > 0). A missing
  optional field gives zeros with its has_* flag 0. A field whose flag is 1 must
  be finite. In a field whose flag is 0, non-finite values become 0 (and the
  visibility / confidence of those joints 0), since METRO's 2D loss still reads
  2D joints through their visibility even when has_2d_joints is 0.

  Args:
    label: the dict from the label tsv (lists or arrays).
    hand: a hand label (module docstring) instead of a body label.

  Returns:
    dict with center [2], scale [], joints_2d [24, 3] (float64, as the JSON
    holds them: FLOAT64_FIELDS), joints_3d [24, 4], pose [72], betas [10],
    has_2d_joints, has_3d_joints, has_smpl [] (float32); for a hand
    joints_2d [21, 3], joints_3d [21, 4], pose [48] and also is_left [].

  Raises:
    ValueError: naming the offending field.
  """
  if not isinstance(label, dict):
    raise ValueError(f'label must be a dict, got {type(label).__name__}')
  for name in ('center', 'scale'):
    if name not in label:
      raise ValueError(f'label has no {name!r}')
  center = _field(label, 'center', (2,))
  try:
    scale = float(np.asarray(label['scale'], np.float64).reshape(()))
  except (TypeError, ValueError) as e:
    raise ValueError(f'scale must be a number, got {label["scale"]!r}') from e
  if not np.all(np.isfinite(center)):
    raise ValueError(f'center is not finite: {center.tolist()}')
  if not (np.isfinite(scale) and scale > 0):
    raise ValueError(f'scale must be finite and > 0, got {scale}')

  out = {'center': center, 'scale': np.float64(scale)}
  flags = {}
  for field, flag_name, shape, name in _HAND_OPTIONAL_FIELDS if hand else _OPTIONAL_FIELDS:
    flag = _flag(label, flag_name) if label.get(field) is not None else 0.0
    # pose and betas share has_smpl: a pose without betas (or vice versa) is
    # unusable for the SMPL losses, so both must be present for it to hold.
    flag = min(flag, flags.get(flag_name, 1.0))
    flags[flag_name] = flag
    dtype = np.float64 if name in FLOAT64_FIELDS else np.float32
    if label.get(field) is None:
      out[name] = np.zeros(shape, dtype)
      continue
    value = _field(label, field, shape)
    bad = ~np.isfinite(value)
    if bad.any():
      if flag:
        raise ValueError(f'{field} has non-finite values while {flag_name}=1')
      # Joints: drop the whole joint (visibility / confidence included).
      value[bad.any(axis=1) if value.ndim == 2 else bad] = 0.0
    out[name] = value.astype(dtype)
  for flag_name, flag in flags.items():
    out[flag_name] = np.float32(flag)
  if hand:
    side = label.get('hand_type', 'right')
    if side not in HAND_TYPES:
      raise ValueError(f'hand_type must be one of {list(HAND_TYPES)}, got {side!r}')
    out['is_left'] = np.float32(side == 'left')
  return out


def parse_label_text(text, hand=False):
  """Parses the label column (JSON list; METRO uses its first dict); hand: `parse_label`'s."""
  try:
    labels = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'label is not valid JSON: {e}') from e
  if isinstance(labels, dict):
    labels = [labels]
  if not isinstance(labels, list) or not labels:
    raise ValueError('label must be a non-empty JSON list of dicts')
  return parse_label(labels[0], hand)


def encode_label(label, hand=False):
  """Validates a label dict and returns the label column (JSON list of one).

  Every key METRO's reader indexes must be present (gender is optional), and
  the label must parse with `parse_label` (of a hand label with hand=True);
  NaN/inf are rejected.
  """
  missing = [k for k in _LABEL_KEYS if k not in label]
  if missing:
    raise ValueError(f'label is missing {missing}; METRO reads all of ' f'{list(_LABEL_KEYS)}')
  parse_label(label, hand)
  # NumPy arrays and scalars both have .tolist().
  return json.dumps([label], allow_nan=False, default=lambda v: v.tolist())
