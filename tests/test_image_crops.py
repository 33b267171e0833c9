"""Image files and boxes -> model crops (coarsemetro_jax/image_crops.py)."""

import cv2
import numpy as np
import pytest

from coarsemetro_jax import image_crops
from coarsemetro_jax import image_ops


def write_image(path, image):
  assert cv2.imwrite(str(path), image)
  return str(path)


def test_crop_around_a_box_and_back_to_image_pixels():
  image = np.zeros((100, 120, 3), np.uint8)
  image[20:60, 10:50] = 200  # the box x, y, w, h = 10, 20, 40, 40
  crop = image_crops.crop_image('im', image, (10, 20, 40, 40), 64, padding=1.0)
  assert crop.center == (29.5, 39.5) and crop.side == 40
  assert (crop.pixels[1:-1, 1:-1] == 200).all()  # the box fills the crop
  # Crop borders (-1, 1) map to the box edges (pixel centres at integers).
  np.testing.assert_allclose(
      image_crops.crop_to_image([[-1, -1], [0, 0], [1, 1]], crop),
      [[9.5, 19.5], [29.5, 39.5], [49.5, 59.5]],
      atol=1e-9,
  )


def test_large_images_are_averaged_not_aliased():
  stripes = np.zeros((1200, 1200, 3), np.uint8)
  stripes[:, ::2] = 255  # 1-pixel black/white columns
  stripes[:600, :600] = 0  # a black top-left quadrant
  crop = image_crops.crop_image('big', stripes, None, 64).pixels.astype(float)
  grey = crop[36:, 36:]  # grey, not stripes
  assert abs(grey.mean() - 127.5) < 2 and grey.std() < 8
  np.testing.assert_array_equal(crop[:28, :28], 0)  # the quadrant stays put
  # The plain bilinear warp aliases the stripes (what averaging avoids).
  plain = image_ops.warp_image(stripes, image_crops.crop_image('big', stripes, None, 64).matrix, 64)
  assert plain[40:, 40:].std() > 50
  # Same geometry as the plain warp: the quadrant's edge at crop pixel 32.
  edge = np.argmax(crop[10, :, 0] > 60)  # first grey column
  assert abs(edge - 32) <= 1
  # On a smooth image both warps agree (same matrix, to a grey level).
  yy, xx = np.mgrid[:1000, :1500]
  smooth = np.stack([xx * 0.15, yy * 0.2, (xx + yy) * 0.1], -1).astype(np.uint8)
  got = image_crops.crop_image('smooth', smooth, (300, 100, 800, 700), 64)
  want = image_ops.warp_image(smooth, got.matrix, 64)
  assert np.abs(got.pixels.astype(int) - want).max() <= 2


def test_whole_image_crop_warns_on_odd_aspect():
  crop = image_crops.crop_image('wide.png', np.zeros((50, 150, 3), np.uint8), None, 64)
  assert crop.side == 150 and crop.center == (74.5, 24.5)
  assert any('pass --bbox' in n for n in crop.notes)
  assert not image_crops.crop_image('sq.png', np.zeros((60, 50, 3), np.uint8), None, 64).notes


def test_grayscale_rgba_and_16_bit_images_load_as_rgb(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  image, notes = image_crops.load_image(write_image(tmp_path / 'g.png', gray))
  assert image.shape == (20, 30, 3) and 'grayscale' in notes[0]
  np.testing.assert_array_equal(image[..., 1], gray)
  bgra = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
  image, notes = image_crops.load_image(write_image(tmp_path / 'a.png', bgra))
  np.testing.assert_array_equal(image, bgra[..., 2::-1])
  assert 'alpha' in notes[0]
  deep = gray.astype(np.uint16) * 257
  image, notes = image_crops.load_image(write_image(tmp_path / 'd.png', deep))
  np.testing.assert_array_equal(image[..., 0], gray)


@pytest.mark.parametrize(
    'content, message',
    [
        (b'', 'empty file'),
        (b'this is not an image', 'not a readable image'),
    ],
)
def test_unreadable_images_name_the_file(tmp_path, content, message):
  path = tmp_path / 'bad.jpg'
  path.write_bytes(content)
  with pytest.raises(image_crops.ImageError, match=message) as e:
    image_crops.load_image(str(path))
  assert str(path) in str(e.value)


def test_huge_image_is_refused(tmp_path):
  path = write_image(tmp_path / 'big.png', np.zeros((1000, 2000, 3), np.uint8))
  with pytest.raises(
      image_crops.ImageError, match=r'big.png: 2000 x 1000 = 2 megapixels.*limit of 1'
  ):
    image_crops.load_image(path, max_megapixels=1)


@pytest.mark.parametrize(
    'bbox, message',
    [
        ((200, 10, 30, 30), 'lies outside the 120 x 100 image'),
        ((-50, 10, 40, 30), 'lies outside'),
    ],
)
def test_box_outside_the_image(bbox, message):
  with pytest.raises(image_crops.ImageError, match=message):
    image_crops.crop_image('im.png', np.zeros((100, 120, 3), np.uint8), bbox, 64)


@pytest.mark.parametrize(
    'shape, bbox, message',
    [
        ((1, 1, 3), None, r'tiny.png: the image is 1 x 1 px; at least 32 px on each side'),
        ((31, 200, 3), None, r'the image is 200 x 31 px'),
        ((31, 200, 3), (0, 0, 100, 20), r'the image is 200 x 31 px'),
        ((100, 120, 3), (10, 10, 20, 26), r'box x,y,w,h = 10,10,20,26 gives a 31.2 px crop'),
    ],
)
def test_too_small_images_and_boxes_are_refused(shape, bbox, message):
  with pytest.raises(image_crops.ImageError, match=message):
    image_crops.crop_image('tiny.png', np.zeros(shape, np.uint8), bbox, 64)
  # The smallest accepted sizes: 32 px sides, a box giving a 32 px crop.
  assert image_crops.crop_image('ok.png', np.zeros((32, 32, 3), np.uint8), None, 64)
  image = np.zeros((100, 120, 3), np.uint8)
  assert image_crops.crop_image('ok.png', image, (10, 10, 20, 26.7), 64, padding=1.2)


@pytest.mark.parametrize(
    'text, message',
    [
        ('1,2,3', '4 finite numbers'),
        ('a,b,c,d', 'expected x,y,w,h numbers'),
        ('1,2,0,5', 'must be positive'),
        ('1,2,nan,5', 'finite'),
    ],
)
def test_bad_bbox_strings(text, message):
  with pytest.raises(ValueError, match=message):
    image_crops.parse_bbox(text)


def test_collect_images_reports_missing_paths(tmp_path):
  a = write_image(tmp_path / 'a.png', np.zeros((4, 4, 3), np.uint8))
  (tmp_path / 'notes.txt').write_text('x')
  paths, problems = image_crops.collect_images(
      [str(tmp_path), a, str(tmp_path / 'nope.jpg'), str(tmp_path / '*.bmp')]
  )
  assert paths == [a]
  assert problems == [
      f'{tmp_path / "nope.jpg"}: no such file or folder',
      f'{tmp_path / "*.bmp"}: pattern matches no files',
  ]
