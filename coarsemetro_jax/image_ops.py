"""Image geometry and colour ops shared by training data, inference and pictures.

NumPy/OpenCV only (no JAX, no TensorFlow), so data-loading threads and worker
processes can use them. The training augmentation (`data_pipelines.augment`),
the inference crops (`image_crops`) and the pictures (`visualize`) all crop and
normalise through these, so a model sees the same pixels in training, eval and
inference.

Conventions:
  * Pixel coordinates have pixel centres at integers (OpenCV). The crop box is
    a square of side `BOX_SIZE * scale` centred at `center`, mapped onto the
    S x S crop so that `center` lands at the crop centre (S - 1) / 2.
  * Normalised crop coordinates are 2 * (x' + 0.5) / S - 1 for a crop pixel
    x', i.e. 2 * px / S - 1 with px the continuous crop coordinate: the crop
    borders are -1 and 1, the box centre is 0, and a horizontal flip is
    exactly x -> -x.
  * A positive rotation `rot` (degrees) turns the image content counter-
    clockwise on screen, as METRO's `crop(..., rot=rot)`.
  * Images are uint8 RGB [H, W, 3]; the model takes them ImageNet-normalised
    (`color_normalize`).
"""

import cv2
import numpy as np

BOX_SIZE = 200.0  # a label's `scale` is the box side in units of 200 px
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rotation_2d(rot):
  """In-plane rotation [2, 2] for y-down coordinates (METRO's Rz(-rot))."""
  a = np.deg2rad(rot)
  return np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def crop_matrix(center, scale, size, rot=0.0, flip=False):
  """Affine [2, 3] from original-image pixels to crop pixels.

  Args:
    center: [2] box centre (x, y), original-image pixels.
    scale: box side / BOX_SIZE (in training already multiplied by the
      augmentation's sc).
    size: crop side S.
    rot: rotation in degrees (counter-clockwise on screen).
    flip: mirror the crop horizontally.

  Returns:
    [2, 3] float64 matrix M; crop_xy = M[:, :2] @ xy + M[:, 2].
  """
  zoom = size / (BOX_SIZE * scale)
  mid = (size - 1) / 2.0
  lin = zoom * rotation_2d(rot)  # [2, 2]
  offset = mid - lin @ np.asarray(center, np.float64)  # [2]
  if flip:  # x' -> S - 1 - x'
    lin[0] = -lin[0]
    offset[0] = size - 1 - offset[0]
  return np.concatenate([lin, offset[:, None]], axis=1)


def single_threaded_opencv():
  """Process-wide: OpenCV runs each call on the calling thread."""
  cv2.setNumThreads(1)


def decode_jpeg(jpeg):
  """JPEG bytes -> RGB uint8 [H, W, 3] (cv2, as METRO); None if corrupt."""
  bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
  if bgr is None:
    return None
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def warp_image(image, matrix, size):
  """Bilinear crop [S, S, C] of `image` through `matrix`, zero outside."""
  return cv2.warpAffine(
      image,
      matrix,
      (size, size),
      flags=cv2.INTER_LINEAR,
      borderMode=cv2.BORDER_CONSTANT,
      borderValue=0,
  )


def color_normalize(image, pn=(1.0, 1.0, 1.0)):
  """Colour noise, then ImageNet normalisation: uint8 RGB -> float32.

  Every pixel becomes (min(x * pn_c, 255) / 255 - mean_c) / std_c (METRO's
  clip, /255 and `Normalize`). The result depends only on the uint8 level, so
  it is a 256-entry table per channel applied in one `cv2.LUT` pass, much
  cheaper than the float arithmetic on the whole crop.

  Args:
    image: uint8 [H, W, 3] RGB.
    pn: [3] per-channel noise (1 at test time).

  Returns:
    float32 [H, W, 3].
  """
  levels = np.arange(256, dtype=np.float32)[:, None]  # [256, 1]
  noisy = np.minimum(levels * np.asarray(pn, np.float32), 255.0)  # [256, 3]
  lut = (noisy / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  return cv2.LUT(image, lut.astype(np.float32)[None])
