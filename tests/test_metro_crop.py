"""The official METRO crop: hand-computed boxes and keypoints, and a literal transcription.

Hand cases use R = 128 and s = 1.28 (h = 256 exactly), so that T (x -> x / 2 +
64 - cx / 2) and its inverse (x' -> 2 x' + cx - 128) are exact in float64 for
integer and half-integer centres, and the integer truncations can be done on
paper.
"""

import cv2
import numpy as np
import pytest
import scipy.linalg

from coarsemetro_jax import joints
from data_pipelines import metro_crop

R, S = 128, 1.28


# ---------------------------------------------------------------------------
# Hand-computed cases.


@pytest.mark.parametrize(
    'center, ul, br, pad',
    [
        # Integer centre: ul = cx - 128, br = cx + 128; the box sticks out above and left.
        ((100, 80), (-28, -48), (228, 208), 53),
        # Half-integer centre, box partly outside: int() truncates -27.5 to -27
        # (towards zero), 228.5 to 228, so the box is 255 px wide, not 256.
        ((100.5, 80.5), (-27, -47), (228, 208), 52),
        # Half-integer centre inside: 72.5 -> 72, 328.5 -> 328 (256 px).
        ((200.5, 140.5), (72, 12), (328, 268), 53),
    ],
)
def test_crop_box_hand_cases(center, ul, br, pad):
  got_ul, got_br, got_pad = metro_crop.crop_box(center, S, R)
  assert tuple(got_ul) == ul and tuple(got_br) == br
  # pad = int(|br - ul| / 2 - (br_y - ul_y) / 2): int(256 (sqrt 2 - 1) / 2) = 53.
  assert got_pad == pad


def test_crop_places_the_box_and_zero_fills_outside():
  # A linear image (float, so nothing is clipped): value = x + 3 y.
  height, width = 150, 260
  y, x = np.mgrid[:height, :width].astype(np.float64)
  img = np.stack([x + 3 * y, x, y], -1)
  out = metro_crop.crop(img, (100, 80), S, R)  # box x -28..227, y -48..207
  assert out.shape == (R, R, 3) and out.dtype == np.float64
  # A 2:1 INTER_LINEAR shrink averages 2x2 blocks: output (i, j) reads the
  # canvas at (2 i + 0.5, 2 j + 0.5) = image (2 i + 0.5 - 48, 2 j + 0.5 - 28).
  i, j = np.mgrid[:R, :R].astype(np.float64)
  img_y, img_x = 2 * i + 0.5 - 48, 2 * j + 0.5 - 28
  inside = (img_y > 0) & (img_y < height - 1) & (img_x > 0) & (img_x < width - 1)
  np.testing.assert_allclose(out[inside, 0], (img_x + 3 * img_y)[inside], atol=1e-9)
  np.testing.assert_allclose(out[inside, 2], img_y[inside], atol=1e-9)
  outside = (img_y < -1) | (img_x < -1) | (img_y > height) | (img_x > width)
  assert outside.any() and inside.any() and not np.any(out[outside])


def test_rotated_crop_of_a_flat_image_is_flat_inside():
  img = np.full((400, 400, 3), 100, np.uint8)
  for rot in (30, -30):
    out = metro_crop.crop(img, (200, 200), S, R, rot=rot)
    assert out.shape == (R, R, 3)
    np.testing.assert_allclose(out[8:-8, 8:-8], 100.0, atol=1e-9)


def test_keypoints_hand_cases():
  kp = np.zeros((24, 3))
  kp[0] = [10.6, 20.2, 1]  # T: (5.3 + 14, 10.1 + 24) = (19.3, 34.1) -> (19, 34) + 1
  kp[1] = [-40.4, 30, 1]  # (-20.2 + 14, 15 + 24) = (-6.2, 39) -> (-6, 39) + 1
  kp[2] = [120, 120, 0]  # (74, 84): 10, 20 px right of / below the crop centre
  out = metro_crop.joints_2d_processing(kp, (100, 80), S, R)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[0], [2 * 20 / R - 1, 2 * 35 / R - 1, 1])
  np.testing.assert_array_equal(out[1], [2 * -5 / R - 1, 2 * 40 / R - 1, 1])
  np.testing.assert_array_equal(out[2], [2 * 75 / R - 1, 2 * 85 / R - 1, 0])
  # r = 30: -30 degrees about (64, 64): (10, 20) -> (10 cos30 + 20 sin30,
  # -10 sin30 + 20 cos30) = (18.66, 12.32) -> (82.66, 76.32) -> (82, 76) + 1.
  out = metro_crop.joints_2d_processing(kp, (100, 80), S, R, rot=30)
  np.testing.assert_array_equal(out[2], [2 * 83 / R - 1, 2 * 77 / R - 1, 0])
  # r = -30: (10 cos30 - 20 sin30, 10 sin30 + 20 cos30) = (-1.34, 22.32) -> (62, 86) + 1.
  out = metro_crop.joints_2d_processing(kp, (100, 80), S, R, rot=-30)
  np.testing.assert_array_equal(out[2], [2 * 63 / R - 1, 2 * 87 / R - 1, 0])
  # Flip: J24 left/right swap (R_Ankle 0 <-> L_Ankle 5), x -> -x.
  out = metro_crop.joints_2d_processing(kp, (100, 80), S, R, flip=True)
  assert joints.J24_FLIP_PERM[5] == 0
  np.testing.assert_array_equal(out[5], [1 - 2 * 20 / R, 2 * 35 / R - 1, 1])


def test_inverse_rounds_as_lapack_getri():
  # For r = 0, getri gives 1/a and -(b * (1/a)); -b/a (getrs, newer PyTorch)
  # rounds differently, and here moves ul from 46 to 47 (exactly 47 on paper).
  t = metro_crop.get_transform((100, 100), 0.53, 224)
  inv = metro_crop.inverse(t)
  assert inv[0, 0] == 1 / t[0, 0] and inv[0, 2] == -(t[0, 2] * (1 / t[0, 0]))
  assert int(-t[0, 2] / t[0, 0]) == 47
  ul, br, _ = metro_crop.crop_box((100, 100), 0.53, 224)
  assert tuple(ul) == (46, 46) and tuple(br) == (153, 153)


def test_decode_image_is_rgb_and_rejects_garbage():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  ok, png = cv2.imencode('.png', rgb[..., ::-1])  # OpenCV writes BGR
  assert ok
  np.testing.assert_array_equal(metro_crop.decode_image(png.tobytes()), rgb)
  with pytest.raises(ValueError, match='cannot decode image'):
    metro_crop.decode_image(b'not an image')


# ---------------------------------------------------------------------------
# A literal transcription of the official steps (METRO's image_ops.py and
# MeshTSVDataset; torch.inverse -> LAPACK getrf + getri, Normalize in float32).


def _ref_get_transform(center, scale, res, rot=0):
  h = 200 * scale
  t = np.zeros((3, 3))
  t[0, 0] = float(res[1]) / h
  t[1, 1] = float(res[0]) / h
  t[0, 2] = res[1] * (-float(center[0]) / h + 0.5)
  t[1, 2] = res[0] * (-float(center[1]) / h + 0.5)
  t[2, 2] = 1
  if rot != 0:
    rot = -rot
    rot_mat = np.zeros((3, 3))
    rot_rad = rot * np.pi / 180
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    rot_mat[0, :2] = [cs, -sn]
    rot_mat[1, :2] = [sn, cs]
    rot_mat[2, 2] = 1
    t_mat = np.eye(3)
    t_mat[0, 2] = -res[1] / 2
    t_mat[1, 2] = -res[0] / 2
    t_inv = t_mat.copy()
    t_inv[:2, 2] *= -1
    t = np.dot(t_inv, np.dot(rot_mat, np.dot(t_mat, t)))
  return t


def _ref_transform(pt, center, scale, res, invert=0, rot=0):
  t = _ref_get_transform(center, scale, res, rot=rot)
  if invert:
    lu, piv, _ = scipy.linalg.lapack.dgetrf(t)
    t, _ = scipy.linalg.lapack.dgetri(lu, piv)
  new_pt = np.array([pt[0] - 1, pt[1] - 1, 1.0]).T
  new_pt = np.dot(t, new_pt)
  return new_pt[:2].astype(int) + 1


def _ref_crop(img, center, scale, res, rot=0):
  ul = np.array(_ref_transform([1, 1], center, scale, res, invert=1)) - 1
  br = np.array(_ref_transform([res[0] + 1, res[1] + 1], center, scale, res, invert=1)) - 1
  pad = int(np.linalg.norm(br - ul) / 2 - float(br[1] - ul[1]) / 2)
  if rot != 0:
    ul -= pad
    br += pad
  new_shape = [br[1] - ul[1], br[0] - ul[0]]
  if len(img.shape) > 2:
    new_shape += [img.shape[2]]
  new_img = np.zeros(new_shape)
  new_x = max(0, -ul[0]), min(br[0], len(img[0])) - ul[0]
  new_y = max(0, -ul[1]), min(br[1], len(img)) - ul[1]
  old_x = max(0, ul[0]), min(len(img[0]), br[0])
  old_y = max(0, ul[1]), min(len(img), br[1])
  new_img[new_y[0] : new_y[1], new_x[0] : new_x[1]] = img[old_y[0] : old_y[1], old_x[0] : old_x[1]]
  if rot != 0:
    h, w = new_img.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), rot, 1.0)
    new_img = cv2.warpAffine(new_img, matrix, (w, h), borderValue=0)
    new_img = new_img[pad:-pad, pad:-pad]
  return cv2.resize(new_img, (res[0], res[1]), interpolation=cv2.INTER_LINEAR)


def _ref_example(img, center, scale, kp, res, rot, flip, pn):
  rgb_img = _ref_crop(img, center, scale, [res, res], rot=rot)
  if flip:
    rgb_img = np.fliplr(rgb_img)
  for c in range(3):
    rgb_img[:, :, c] = np.minimum(255.0, np.maximum(0.0, rgb_img[:, :, c] * pn[c]))
  rgb_img = np.transpose(rgb_img.astype('float32'), (2, 0, 1)) / 255.0
  mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
  std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
  image = np.transpose((rgb_img - mean) / std, (1, 2, 0))
  kp = kp.copy()
  for i in range(kp.shape[0]):
    kp[i, 0:2] = _ref_transform(kp[i, 0:2] + 1, center, scale, [res, res], rot=rot)
  kp[:, :-1] = 2.0 * kp[:, :-1] / res - 1.0
  if flip:
    kp = kp[[5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13, 14, 15, 16, 17, 18, 19, 21, 20, 23, 22]]
    kp[:, 0] = -kp[:, 0]
  return image, kp.astype('float32')


CASES = [  # (centre, scale, rot, flip, pn)
    ((64.0, 50.0), 0.6, 0, False, (1, 1, 1)),  # integer centre
    ((64.5, 49.5), 0.55, 0, False, (1, 1, 1)),  # half-integer centre
    ((10.25, 90.75), 0.8, 0, False, (1, 1, 1)),  # partly outside
    ((70.0, 48.0), 0.5, 30, False, (1, 1, 1)),  # rotation +30
    ((55.5, 60.5), 0.7, -30, True, (0.7, 1.2, 1.4)),  # -30, flip, noise
    ((87.3121, 33.8907), 0.66137, 17.38, True, (1.31, 0.64, 1.0)),
    ((112.3, 140.7), 1.0, 0, False, (1, 1, 1)),  # box wider than the image
]


@pytest.mark.parametrize('res', [224, 96])
@pytest.mark.parametrize('center, scale, rot, flip, pn', CASES)
def test_matches_literal_transcription_to_the_last_bit(center, scale, rot, flip, pn, res):
  rng = np.random.default_rng(res)
  img = rng.integers(0, 256, (101, 131, 3), dtype=np.uint8)
  kp = np.concatenate([rng.uniform(-20, 150, (24, 2)), rng.integers(0, 2, (24, 1))], 1)
  image, kp_out = metro_crop.image_and_joints_2d(img, center, scale, kp, res, rot, flip, pn)
  ref_image, ref_kp = _ref_example(img, center, scale, kp, res, rot, flip, pn)
  assert image.dtype == np.float32 and image.shape == (res, res, 3)
  np.testing.assert_array_equal(image, ref_image)
  np.testing.assert_array_equal(kp_out, ref_kp)


def test_box_outside_the_image_gives_zeros():
  img = np.full((50, 60, 3), 200, np.uint8)
  out = metro_crop.crop(img, (500.0, 500.0), 0.5, 32)
  assert out.shape == (32, 32, 3) and not np.any(out)
