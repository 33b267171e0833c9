"""Image geometry and colour ops (coarsemetro_jax/image_ops.py) on hand-computed cases."""

import cv2
import numpy as np
import pytest

from coarsemetro_jax import image_ops


@pytest.mark.parametrize(
    'rot, flip, right_of_centre',
    [
        (0.0, False, (63.5, 31.5)),  # the box's right edge is the crop's right edge
        (0.0, True, (-0.5, 31.5)),  # mirrored: the left edge
        (90.0, False, (31.5, -0.5)),  # turned counter-clockwise on screen: the top edge
    ],
)
def test_crop_matrix_maps_the_box_onto_the_crop(rot, flip, right_of_centre):
  # Box of side 200 * 0.5 = 100 px around (100, 50) onto a 64-px crop: zoom 0.64.
  matrix = image_ops.crop_matrix((100.0, 50.0), 0.5, 64, rot, flip)
  points = np.array([[100.0, 50.0], [150.0, 50.0]])
  crop = points @ matrix[:, :2].T + matrix[:, 2]
  np.testing.assert_allclose(crop, [(31.5, 31.5), right_of_centre], atol=1e-9)


def test_warp_image_is_zero_outside_the_image():
  image = np.full((10, 10, 3), 200, np.uint8)
  matrix = image_ops.crop_matrix((4.5, 4.5), 20 / image_ops.BOX_SIZE, 20)  # a 20-px box
  crop = image_ops.warp_image(image, matrix, 20)
  assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8
  np.testing.assert_array_equal(crop[6:14, 6:14], 200)
  np.testing.assert_array_equal(crop[:4], 0)


def test_decode_jpeg_gives_rgb_and_none_when_corrupt():
  rgb = np.zeros((16, 16, 3), np.uint8)
  rgb[..., 0] = 250  # red
  ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  assert ok
  decoded = image_ops.decode_jpeg(jpeg.tobytes())
  assert decoded.shape == (16, 16, 3)
  assert np.abs(decoded.astype(int) - rgb).max() <= 3
  assert image_ops.decode_jpeg(b'\xff\xd8 not a jpeg') is None


def test_color_normalize_matches_metro_arithmetic():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  image[0, 0] = [255, 250, 0]
  pn = (1.4, 0.6, 1.1)  # 250 * 1.4 clips at 255
  # METRO: clip(x * pn), / 255, torchvision Normalize(mean, std).
  ref = np.clip(image.astype(np.float64) * pn, 0, 255) / 255
  ref = (ref - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  out = image_ops.color_normalize(image, pn)
  assert out.dtype == np.float32 and out.shape == image.shape
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(out[0, 0, 0], (1 - 0.485) / 0.229, rtol=1e-6)
  # Without noise (test time): plain ImageNet normalisation.
  plain = (image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(image_ops.color_normalize(image), plain, atol=1e-5)
