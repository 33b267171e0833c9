"""Clothing-like per-vertex colours and random backgrounds.

The body is dressed from its skinning weights: every vertex belongs to the
joint with the largest weight (its part), and limb vertices also get their
position along the limb in the rest pose, so a sleeve or a trouser leg of any
length is a threshold on that coordinate.
"""

import dataclasses

import cv2
import numpy as np

# SMPL joint groups (coarsemetro_jax.joints.SMPL_JOINT_NAMES).
_TORSO = (0, 3, 6, 9, 13, 14)
_ARMS = (16, 17, 18, 19)
_LEGS = (1, 2, 4, 5)
_FEET = (7, 8, 10, 11)
_HEAD = 15
# Skin tones (sRGB in [0, 1]), pale to dark.
SKIN_TONES = np.array(
    [
        [0.96, 0.80, 0.69],
        [0.92, 0.74, 0.60],
        [0.86, 0.65, 0.52],
        [0.78, 0.57, 0.44],
        [0.66, 0.46, 0.33],
        [0.55, 0.37, 0.26],
        [0.42, 0.28, 0.19],
        [0.31, 0.21, 0.15],
    ]
)
HAIR_COLOURS = np.array(
    [
        [0.05, 0.04, 0.04],
        [0.16, 0.10, 0.06],
        [0.32, 0.20, 0.11],
        [0.60, 0.45, 0.25],
        [0.85, 0.72, 0.45],
        [0.55, 0.55, 0.55],
        [0.50, 0.20, 0.08],
    ]
)


@dataclasses.dataclass(frozen=True)
class VertexParts:
  """Per-vertex dressing coordinates, computed once from the rest mesh."""

  part: np.ndarray  # [V] int: argmax skinning joint
  arm_t: np.ndarray  # [V] position along shoulder->wrist (0..1), arm vertices
  leg_t: np.ndarray  # [V] position along hip->ankle (0..1), leg vertices
  height: np.ndarray  # [V] rest y minus the spine1 joint's y (metres)
  head_up: np.ndarray  # [V] rest y minus the head joint's y
  head_back: np.ndarray  # [V] head joint's z minus rest z (> 0: behind)
  neck_dist: np.ndarray  # [V] rest y minus the neck joint's y


def _along(verts, start, end):
  d = end - start
  return (verts - start) @ d / (d @ d)


def vertex_parts(rest_vertices, rest_joints, weights):
  """Dressing coordinates of a rest mesh (SMPL axes: Y up, face +Z)."""
  v, j = np.asarray(rest_vertices), np.asarray(rest_joints)
  part = np.argmax(weights, axis=1)
  left = v[:, 0] >= 0  # The body's left is +X.
  arm_t = np.where(left, _along(v, j[16], j[20]), _along(v, j[17], j[21]))
  leg_t = np.where(left, _along(v, j[1], j[7]), _along(v, j[2], j[8]))
  return VertexParts(
      part=part,
      arm_t=arm_t,
      leg_t=leg_t,
      height=v[:, 1] - j[3, 1],
      head_up=v[:, 1] - j[15, 1],
      head_back=j[15, 2] - v[:, 2],
      neck_dist=v[:, 1] - j[12, 1],
  )


def cloth_colour(rng):
  """A random clothing colour [3] (sRGB in [0, 1])."""
  hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 220), rng.uniform(30, 240)]]], np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] / 255.0


def vertex_albedo(rng, parts):
  """[V, 3] random outfit: skin, hair, shirt (any sleeve), trousers, shoes."""
  skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.05, 3)
  shirt, pants, shoes = cloth_colour(rng), cloth_colour(rng), cloth_colour(rng) * 0.6
  hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
  p = parts.part
  albedo = np.tile(skin, (len(p), 1))
  is_torso, is_arm, is_leg = np.isin(p, _TORSO), np.isin(p, _ARMS), np.isin(p, _LEGS)
  # Shirt: torso above the waist line (skin at a random neckline) and the
  # arms up to a random sleeve length (none, short, three-quarter, long).
  waist = rng.uniform(-0.12, 0.02)
  neckline = rng.uniform(0.02, 0.1)
  sleeve = (rng.uniform(-0.1, 0.05), rng.uniform(0.2, 0.45), rng.uniform(0.55, 0.8), 1.1)[
      rng.choice(4, p=(0.15, 0.4, 0.1, 0.35))
  ]
  in_shirt = (is_torso & (parts.height >= waist) & (parts.neck_dist < -neckline)) | (
      is_arm & (parts.arm_t < sleeve)
  )
  # Trousers: torso below the waist and the legs to a random length.
  trouser = rng.uniform(0.3, 0.55) if rng.uniform() < 0.3 else 1.1
  in_pants = (is_torso & (parts.height < waist)) | (is_leg & (parts.leg_t < trouser))
  if rng.uniform() < 0.35:  # Stripes or bands on the shirt.
    period = rng.uniform(0.05, 0.15)
    band = np.sin(2 * np.pi * parts.height / period + rng.uniform(0, 2 * np.pi)) > 0
    shirt_v = np.where(band[:, None], shirt, cloth_colour(rng))
  else:
    shirt_v = np.broadcast_to(shirt, albedo.shape)
  albedo = np.where(in_shirt[:, None], shirt_v, albedo)
  albedo[in_pants] = pants
  if rng.uniform() < 0.92:
    albedo[np.isin(p, _FEET)] = shoes
  # Hair: the top of the head, plus the back down to a random length.
  if rng.uniform() < 0.9:
    top, length = rng.uniform(0.06, 0.1), rng.uniform(-0.02, 0.12)
    is_head = p == _HEAD
    back = (parts.head_back > 0.02) & (parts.head_up > -length)
    in_hair = is_head & ((parts.head_up > top) | back)
    albedo[in_hair] = hair
  # A little per-vertex variation so large areas are not perfectly flat.
  albedo = albedo * rng.uniform(0.95, 1.05, (len(p), 1))
  return np.clip(albedo, 0.0, 1.0)


def background(rng, height, width):
  """[H, W, 3] float32 in [0, 1]: gradient or blurred noise, plus shapes."""
  kind = rng.choice(3)
  if kind == 0:  # Linear gradient between two colours.
    a, b = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.arange(width, dtype=np.float32)[None] * np.float32(np.cos(ang)) + np.arange(
        height, dtype=np.float32
    )[:, None] * np.float32(
        np.sin(ang)
    )  # [H, W]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = a + t[..., None] * (b - a)
  else:  # Low-frequency colour noise over a base colour (kind 2: grey noise).
    cells = rng.integers(3, 12)
    noise = rng.uniform(-0.5, 0.5, (cells, cells, 1 if kind == 2 else 3)).astype(np.float32)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = noise.reshape(height, width, -1)
    img = rng.uniform(0.15, 0.85, 3).astype(np.float32) + np.float32(rng.uniform(0.2, 0.8)) * noise
  img = np.ascontiguousarray(img, np.float32)
  for _ in range(rng.integers(0, 7)):  # Random shapes (objects, furniture).
    colour = tuple(float(c) for c in rng.uniform(0, 1, 3))
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    size = int(rng.integers(max(4, width // 16), max(8, width // 3)))
    shape = rng.choice(3)
    if shape == 0:
      cv2.rectangle(img, (x0, y0), (x0 + size, y0 + int(rng.integers(4, 2 * size))), colour, -1)
    elif shape == 1:
      cv2.circle(img, (x0, y0), size // 2, colour, -1)
    else:
      end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
      cv2.line(img, (x0, y0), end, colour, int(rng.integers(1, 6)))
  sigma = rng.uniform(0.5, 3.0)
  img = cv2.GaussianBlur(img, (0, 0), sigma)
  return np.clip(img, 0.0, 1.0)
