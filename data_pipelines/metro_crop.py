"""The official METRO/FastMETRO crop (GraphCMR convention), step for step.

`config.data.crop = 'metro'` feeds the network the images and 2D keypoints
that the released evaluation feeds it. augment.py's continuous crop maps image
and joints with one exact affine; this module instead repeats the released
arithmetic, integer truncations included. Symbols: centre (cx, cy), scale s,
box side h = 200 s, output side R, rotation r in degrees.

* Decoding: `cv2.imdecode` (BGR), then BGR -> RGB.
* `get_transform`: T maps pixel (x, y) to
  (R/h x + R (0.5 - cx/h), R/h y + R (0.5 - cy/h)); with r != 0, -r is applied
  about the crop centre (R/2, R/2).
* `transform_point`: T (or its inverse) applied to (p - 1), truncated towards
  zero (`astype(int)`), plus 1.
* `crop`: integer box ul = inv([1, 1]) - 1, br = inv([R + 1, R + 1]) - 1; with
  r != 0 both widen by pad = int(|br - ul| / 2 - (br_y - ul_y) / 2). A zero
  float64 canvas (br_y - ul_y, br_x - ul_x) receives the overlap with the
  image; with r != 0 it is rotated by r about ((w - 1) / 2, (h - 1) / 2) with
  `cv2.warpAffine` (bilinear, border 0) and the padding is cut off; the box is
  resized to R x R with `cv2.resize` INTER_LINEAR (all in float64).
* `rgb_processing`: flip, per-channel noise (1 in eval), clip to [0, 255],
  float32 / 255; `normalize`: ImageNet mean/std in float32.
* `joints_2d_processing`: kp = transform_point(kp + 1), 2 kp / R - 1, then the
  J24 left/right swap and x -> -x if flipped.

Two points where the released code is ill-defined, handled here:
* T's inverse was `torch.inverse` on the CPU, which in the PyTorch the
  checkpoints were made with (1.8) is LAPACK getrf + getri; `inverse` runs
  those routines from scipy's LAPACK (scipy.linalg.inv). For r = 0 its result
  is the closed form 1/a, -(b * (1/a)) of reference LAPACK; the MKL build of
  PyTorch 1.8 was not available to compare bits. Inverting another way
  (getrs, as PyTorch >= 1.13 does, gives -b/a) changes the last bit of about
  half of the matrices, and a truncated box corner of 1 to 2 % of random
  boxes: centre (100, 100), s = 0.53, R = 224 has ul = 46 here, 47 with -b/a.
* A box with no overlap with the image made the released slicing fail; here
  it gives an all-zero crop. A rotated box with pad = 0 (a box under 5 px)
  gave an empty crop there; here nothing is cut.

Labels must keep the JSON's float64 centre, scale and keypoints: rounding them
to float32 first moves box corners and keypoints across integer boundaries
(`metro_labels.parse_label` and the TFDS build keep them float64).
"""

import cv2
import numpy as np
import scipy.linalg

from coarsemetro_jax import joints

BOX_SIZE = 200.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data):
  """Encoded image bytes -> RGB uint8 [H, W, 3]; ValueError if OpenCV cannot decode them."""
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if bgr is None:
    raise ValueError(f'cannot decode image ({len(data)} bytes) with cv2.imdecode')
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def get_transform(center, scale, res, rot=0.0):
  """The [3, 3] float64 affine T from image pixels to crop pixels (module docstring)."""
  h = BOX_SIZE * scale
  t = np.zeros((3, 3))
  t[0, 0] = float(res) / h
  t[1, 1] = float(res) / h
  t[0, 2] = res * (-float(center[0]) / h + 0.5)
  t[1, 2] = res * (-float(center[1]) / h + 0.5)
  t[2, 2] = 1
  if rot != 0:
    rad = -rot * np.pi / 180  # -r: the crop turns opposite to the content
    sn, cs = np.sin(rad), np.cos(rad)
    rot_mat = np.zeros((3, 3))
    rot_mat[0, :2] = [cs, -sn]
    rot_mat[1, :2] = [sn, cs]
    rot_mat[2, 2] = 1
    to_centre = np.eye(3)
    to_centre[0, 2] = -res / 2
    to_centre[1, 2] = -res / 2
    back = to_centre.copy()
    back[:2, 2] *= -1
    t = np.dot(back, np.dot(rot_mat, np.dot(to_centre, t)))
  return t


def inverse(t):
  """T^-1 by LAPACK getrf + getri (what the released code's torch.inverse ran)."""
  return scipy.linalg.inv(t)


def transform_point(pt, center, scale, res, invert=False, rot=0.0):
  """int(T(pt - 1)) + 1 (or with T^-1): int [2]. `pt` is a 1-based pixel."""
  t = get_transform(center, scale, res, rot)
  if invert:
    t = inverse(t)
  new_pt = np.array([pt[0] - 1, pt[1] - 1, 1.0]).T
  new_pt = np.dot(t, new_pt)
  return new_pt[:2].astype(int) + 1


def crop_box(center, scale, res, rot=0.0):
  """(ul [2], br [2], pad): the integer box (x, y) before padding, and the padding."""
  ul = np.array(transform_point([1, 1], center, scale, res, invert=True)) - 1
  br = np.array(transform_point([res + 1, res + 1], center, scale, res, invert=True)) - 1
  pad = int(np.linalg.norm(br - ul) / 2 - float(br[1] - ul[1]) / 2)
  return ul, br, pad


def crop(img, center, scale, res, rot=0.0):
  """The float64 [res, res, C] crop of img [H, W, C] (module docstring)."""
  ul, br, pad = crop_box(center, scale, res, rot)
  if rot != 0:
    ul, br = ul - pad, br + pad
  new_img = np.zeros([br[1] - ul[1], br[0] - ul[0]] + list(img.shape[2:]))
  height, width = img.shape[:2]
  # Overlap of the box with the image, in canvas and in image coordinates.
  x0, x1 = max(0, ul[0]), min(width, br[0])
  y0, y1 = max(0, ul[1]), min(height, br[1])
  if x0 < x1 and y0 < y1:
    new_img[y0 - ul[1] : y1 - ul[1], x0 - ul[0] : x1 - ul[0]] = img[y0:y1, x0:x1]
  if rot != 0:
    h, w = new_img.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), rot, 1.0)
    new_img = cv2.warpAffine(new_img, matrix, (w, h), borderValue=0)
    new_img = new_img[pad : h - pad, pad : w - pad]
  return cv2.resize(new_img, (res, res), interpolation=cv2.INTER_LINEAR)


def rgb_processing(img, center, scale, res, rot=0.0, flip=False, pn=(1.0, 1.0, 1.0)):
  """RGB uint8 [H, W, 3] -> float32 [res, res, 3] in [0, 1]: crop, flip, noise, clip, /255."""
  out = crop(img, center, scale, res, rot)
  if flip:
    out = np.fliplr(out)
  out = np.minimum(255.0, np.maximum(0.0, out * np.asarray(pn, np.float64)))
  return out.astype(np.float32) / 255.0


def normalize(img):
  """ImageNet normalisation in float32 (torchvision's Normalize). [..., 3] -> [..., 3]."""
  return (img - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def joints_2d_processing(kp, center, scale, res, rot=0.0, flip=False):
  """[N, 3] pixel keypoints (x, y, visibility) -> float32 [N, 3], x and y in [-1, 1].

  N = 24 (the J24 order) when flip is set.
  """
  kp = np.array(kp, np.float64)
  for i in range(kp.shape[0]):
    kp[i, 0:2] = transform_point(kp[i, 0:2] + 1, center, scale, res, rot=rot)
  kp[:, :-1] = 2.0 * kp[:, :-1] / res - 1.0
  if flip:
    kp = kp[list(joints.J24_FLIP_PERM)]
    kp[:, 0] = -kp[:, 0]
  return kp.astype(np.float32)


def image_and_joints_2d(
    img, center, scale, joints_2d, res, rot=0.0, flip=False, pn=(1.0, 1.0, 1.0)
):
  """The network input and 2D target of one example.

  Args:
    img: RGB uint8 [H, W, 3] (`decode_image`).
    center: [2] box centre in pixels; scale: box side / 200 (times the
      augmentation's scale factor). Both float64 as read from the label JSON.
    joints_2d: [24, 3] pixel keypoints with visibility.
    res: output side R.
    rot, flip, pn: augmentation (0, False, ones in evaluation).
  Returns:
    image float32 [R, R, 3] ImageNet-normalised, joints_2d float32 [24, 3].
  """
  image = normalize(rgb_processing(img, center, scale, res, rot, flip, pn))
  return image, joints_2d_processing(joints_2d, center, scale, res, rot, flip)
