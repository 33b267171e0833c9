"""Image files and person boxes -> square model crops (infer.py's input side).

`collect_images` expands files, folders and globs; `load_image` decodes any
8/16-bit grayscale, RGB or RGBA file OpenCV reads into uint8 RGB; `crop_image`
cuts the square crop around an x,y,w,h box (enlarged by `BBOX_PADDING`, as
SPIN/METRO crop labels) or the whole image, with the input pipeline's warp
(`image_ops.crop_matrix`, pixel centres at integers), area-averaging first when
it shrinks by more than `MAX_WARP_SHRINK`; `crop_to_image` maps crop points
back to image pixels. Unusable images (unreadable, too large, or with a side
or crop box under `MIN_SIDE` px) raise `ImageError` naming the file.
"""

import dataclasses
import glob
import json
import math
import os

from absl import logging
import cv2
import numpy as np

from coarsemetro_jax import image_ops

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
BBOX_PADDING = 1.2  # crop side = padding * max(w, h), as SPIN/METRO crop labels
MAX_ASPECT = 1.5  # whole-image crops wider/taller than this: warn
MAX_MEGAPIXELS = 100.0  # larger decoded images are refused
MAX_WARP_SHRINK = 2.0  # beyond this, area-average before the bilinear warp
# Images and crop boxes with a side under this hold too few pixels of a person
# for a mesh to mean anything: they are refused, not up-sampled into a crop.
MIN_SIDE = 32


class ImageError(ValueError):
  """An input image (or its box) cannot be used; the message names the file."""


def collect_images(specs):
  """Files, folders and globs -> (sorted unique image paths, problems)."""
  paths, problems = [], []
  for spec in specs:
    if os.path.isdir(spec):
      found = sorted(
          os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS)
      )
      if not found:
        problems.append(f'{spec}: folder has no {"/".join(IMAGE_EXTENSIONS)} files')
    elif os.path.isfile(spec):
      found = [spec]
    elif glob.has_magic(spec):
      found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
      if not found:
        problems.append(f'{spec}: pattern matches no files')
    else:
      found = []
      problems.append(f'{spec}: no such file or folder')
    paths.extend(found)
  return list(dict.fromkeys(paths)), problems


def load_image(path, max_megapixels=MAX_MEGAPIXELS):
  """Image file -> (uint8 RGB [H, W, 3], notes). Raises ImageError."""
  try:
    data = np.fromfile(path, np.uint8)
  except OSError as e:
    raise ImageError(f'{path}: cannot read the file ({e.strerror or e})') from e
  if not data.size:
    raise ImageError(f'{path}: empty file')
  # OpenCV refuses images above 2^30 pixels (CV_IO_MAX_IMAGE_PIXELS) itself.
  image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ImageError(
        f'{path}: not a readable image (OpenCV cannot decode it; expected '
        f'{"/".join(e[1:].upper() for e in IMAGE_EXTENSIONS)} under 2^30 px)'
    )
  notes = []
  h, w = image.shape[:2]
  if h * w > max_megapixels * 1e6:
    raise ImageError(
        f'{path}: {w} x {h} = {h * w / 1e6:.0f} megapixels is above the '
        f'limit of {max_megapixels:g} (--max_megapixels); downscale it first'
    )
  if image.dtype == np.uint16:
    image = np.rint(image / 257.0).astype(np.uint8)
    notes.append('16-bit image scaled to 8 bits')
  elif image.dtype != np.uint8:
    raise ImageError(f'{path}: {image.dtype} pixels are not supported; expected 8 or 16 bits')
  channels = 1 if image.ndim == 2 else image.shape[2]
  if channels == 1:
    image = cv2.cvtColor(image.reshape(h, w), cv2.COLOR_GRAY2RGB)
    notes.append('grayscale image replicated to RGB')
  elif channels == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  elif channels == 4:
    image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    notes.append('alpha channel dropped')
  else:
    raise ImageError(f'{path}: {channels} channels; expected grayscale, RGB or RGBA')
  return image, notes


def parse_bbox(text, where='--bbox'):
  """'x,y,w,h' (or a 4-list) -> tuple of floats; w and h must be positive."""
  try:
    values = [float(v) for v in (text.split(',') if isinstance(text, str) else text)]
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: expected x,y,w,h numbers, got {text!r}') from e
  if len(values) != 4 or not all(math.isfinite(v) for v in values):
    raise ValueError(f'{where}: expected 4 finite numbers x,y,w,h, got {text!r}')
  if values[2] <= 0 or values[3] <= 0:
    raise ValueError(f'{where}: width and height must be positive, got {text!r}')
  return tuple(values)


def read_bboxes_json(path):
  """{"image name or path": [x, y, w, h]} (or a list of {"image", "bbox"})."""
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'--bboxes {path}: not valid JSON ({e})') from e
  if isinstance(data, list):
    try:
      data = {d['image']: d['bbox'] for d in data}
    except (TypeError, KeyError) as e:
      raise ValueError(f'--bboxes {path}: list entries need "image" and "bbox" keys') from e
  if not isinstance(data, dict):
    raise ValueError(f'--bboxes {path}: expected an object of image -> [x, y, w, h]')
  return {k: parse_bbox(v, f'--bboxes {path} [{k!r}]') for k, v in data.items()}


def box_for(path, bboxes):
  """The box of `path` in a {path or file name: box} dict, or None."""
  for key in (path, os.path.abspath(path), os.path.basename(path)):
    if key in bboxes:
      return bboxes[key]
  return None


@dataclasses.dataclass
class Crop:
  """A square crop of an image and where it came from."""

  path: str
  image_size: tuple[int, int]  # original (width, height)
  bbox: tuple | None  # x, y, w, h in original pixels
  center: tuple[float, float]  # crop centre, original pixels
  side: float  # crop side, original pixels
  matrix: np.ndarray  # [2, 3] original -> crop pixels
  pixels: np.ndarray  # uint8 [S, S, 3]
  notes: list


def crop_image(path, image, bbox, size, padding=BBOX_PADDING, notes=()):
  """Crop of `image` around `bbox` (whole image if None). Raises ImageError."""
  notes = list(notes)
  h, w = image.shape[:2]
  if min(h, w) < MIN_SIDE:
    raise ImageError(
        f'{path}: the image is {w} x {h} px; at least {MIN_SIDE} px on each ' 'side is needed'
    )
  if bbox is None:
    center, side = ((w - 1) / 2.0, (h - 1) / 2.0), float(max(h, w))
    if max(h, w) > MAX_ASPECT * min(h, w):
      notes.append(
          f'no box and the image is {w} x {h}: the whole image is the crop, so '
          'the person may be small in it; pass --bbox or --bboxes'
      )
  else:
    x, y, bw, bh = bbox
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
      raise ImageError(
          f'{path}: box x,y,w,h = {",".join(f"{v:g}" for v in bbox)} lies '
          f'outside the {w} x {h} image'
      )
    inside = (min(x + bw, w) - max(x, 0)) * (min(y + bh, h) - max(y, 0)) / (bw * bh)
    if inside < 0.5:
      notes.append(f'only {inside:.0%} of the box lies inside the image')
    # Pixel centres are at integers, so the box spans [x - 0.5, x + w - 0.5).
    center, side = (x + bw / 2.0 - 0.5, y + bh / 2.0 - 0.5), padding * max(bw, bh)
    if side < MIN_SIDE:
      raise ImageError(
          f'{path}: box x,y,w,h = {",".join(f"{v:g}" for v in bbox)} gives a '
          f'{side:g} px crop (with --bbox_padding {padding:g}); at least '
          f'{MIN_SIDE} px is needed'
      )
  matrix = image_ops.crop_matrix(center, side / image_ops.BOX_SIZE, size)
  for note in notes:
    logging.warning('%s: %s', path, note)
  return Crop(
      path,
      (w, h),
      bbox,
      center,
      side,
      matrix,
      _warp_antialiased(image, matrix, side / size, size),
      notes,
  )


def _warp_antialiased(image, matrix, shrink, size):
  """`image_ops.warp_image`, after an area-average down-scaling when `shrink` > 2.

  Bilinear warping samples 4 pixels per output pixel, so a large photo shrunk
  to the crop aliases; averaging first keeps every pixel's contribution.
  """
  if shrink <= MAX_WARP_SHRINK:
    return image_ops.warp_image(image, matrix, size)
  h, w = image.shape[:2]
  small_w = max(1, round(w * MAX_WARP_SHRINK / shrink))
  small_h = max(1, round(h * MAX_WARP_SHRINK / shrink))
  small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
  # Original pixel x -> small pixel (x + 0.5) * small_w / w - 0.5 (centres at integers).
  sx, sy = small_w / w, small_h / h
  to_small = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
  small_matrix = (np.vstack([matrix, [0, 0, 1]]) @ np.linalg.inv(to_small))[:2]
  return image_ops.warp_image(small, small_matrix, size)


def crop_to_image(points_norm, crop):
  """Normalised crop points [..., 2] -> original image pixels (centres at integers)."""
  size = crop.pixels.shape[0]
  px = (np.asarray(points_norm, np.float64) + 1.0) * size / 2.0 - 0.5
  inverse = cv2.invertAffineTransform(crop.matrix)
  return px @ inverse[:, :2].T + inverse[:, 2]
