r"""'metro' vs 'continuous' crop on the embedded test set: how far apart the inputs are.

  python -m benchmarks.crop_difference [--num_examples=200] [--image_sizes=96,224]

The embedded recipe (configs/embedded.py) evaluates with config.data.crop =
'continuous', the paper recipes (configs/r50.py) with 'metro', the released
METRO/FastMETRO crop. This runs both through the evaluation pipeline
(`input_pipeline.create_eval_dataset`) on the first --num_examples images of the
embedded synthetic test set and prints, per crop side R:
  * the image difference |metro - continuous| in ImageNet-normalised units,
    mean and max over pixels and channels;
  * the best-matching shift: the integer (dx, dy) with metro[y, x] closest to
    continuous[y + dy, x + dx] (mean |diff| over the overlap, all images), and
    the sub-pixel shift from phase correlation (mean over images);
  * the 2D keypoint difference metro - continuous in crop pixels over the
    visible joints: mean dx and dy, mean and max |d| per coordinate;
  * the single-thread cost of each crop (decode excluded), in evaluation and
    with r50's training augmentation.

The test images come from the embedded dataset's cache when it was rendered
(`python main.py --config=configs/embedded.py` renders it), else the first
--num_examples test images are rendered into --render_dir; they are the same
images, since each is a function of (seed, split, index).
"""

import json
import os
import shutil
import time

from absl import app
from absl import flags
import cv2
import numpy as np

from configs import embedded
from configs import r50
from data_pipelines import augment
from data_pipelines import datasets
from data_pipelines import input_pipeline
from data_pipelines import metro_crop
from data_pipelines import metro_tsv

_NUM = flags.DEFINE_integer('num_examples', 200, 'test images compared')
_SIZES = flags.DEFINE_list(
    'image_sizes', ['96', '224'], 'crop sides R (96: configs/embedded.py, 224: configs/r50.py)'
)
_RENDER_DIR = flags.DEFINE_string(
    'render_dir',
    '',
    'where to render the test images if the embedded dataset is not cached '
    "('' = config.data.synthetic.dir of configs/embedded.py)",
)
_MAX_SHIFT = 3  # crop px searched in each direction
_TIMED = 50  # examples timed per crop


def _test_yaml(num):
  """The embedded test set's yaml (cached), or a render of its first `num` images."""
  synthetic = embedded.get_config().data.synthetic
  cached = datasets.synthetic_dir(synthetic)
  if os.path.exists(os.path.join(cached, datasets.DONE_MARKER)):
    return os.path.join(cached, 'test.yaml'), f'{cached} (cached)'
  params = {'num_test': num, 'seed': synthetic.seed, 'image_size': synthetic.image_size}
  out = os.path.join(
      os.path.abspath(_RENDER_DIR.value or synthetic.dir),
      f"crop_difference_test{num}_seed{params['seed']}_{params['image_size']}px",
  )
  marker = os.path.join(out, datasets.DONE_MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) != params:
        raise ValueError(f'{out} holds another render; move it away')
    return os.path.join(out, 'test.yaml'), f'{out} (rendered before)'
  # Imported here: rendering is only needed when no test set is there.
  from data_pipelines.synthetic import generate

  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  print(f'Rendering {num} embedded test images into {out} ...', flush=True)
  generate.generate_split(
      generate.load_assets(),
      tmp,
      'test',
      num,
      params['seed'],
      params['image_size'],
      workers=1,
      progress=False,
  )
  with open(os.path.join(tmp, datasets.DONE_MARKER), 'w') as f:
    json.dump(params, f)
  os.replace(tmp, out)
  return os.path.join(out, 'test.yaml'), f'{out} (rendered now)'


def _eval_examples(yaml_path, size, crop, num):
  """image [N, R, R, 3], joints_2d [N, 24, 3] of the first `num` eval examples."""
  data = embedded.get_config().data
  data.source, data.eval_yaml = 'tsv', yaml_path
  data.image_size, data.eval_batch_size, data.crop = size, 50, crop
  images, joints_2d = [], []
  for batch in input_pipeline.create_eval_dataset(
      data, process_index=0, process_count=1
  ).as_numpy_iterator():
    real = batch['mask'] > 0
    images.append(batch['image'][real])
    joints_2d.append(batch['joints_2d'][real])
  return np.concatenate(images)[:num], np.concatenate(joints_2d)[:num]


def shift_errors(a, b, max_shift):
  """{(dx, dy): mean |a[y, x] - b[y + dy, x + dx]|} over the overlap. a, b: [N, R, R, C]."""
  size = a.shape[1]
  out = {}
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      ya, xa = slice(max(0, -dy), size - max(0, dy)), slice(max(0, -dx), size - max(0, dx))
      yb, xb = slice(max(0, dy), size - max(0, -dy)), slice(max(0, dx), size - max(0, -dx))
      out[dx, dy] = float(np.abs(a[:, ya, xa] - b[:, yb, xb]).mean())
  return out


def phase_shift(a, b):
  """Mean sub-pixel (dx, dy) with a[y, x] ~ b[y + dy, x + dx] (phase correlation)."""
  window = cv2.createHanningWindow(a.shape[1:3], cv2.CV_64F)
  shifts = [
      cv2.phaseCorrelate(x.mean(-1).astype(np.float64), y.mean(-1).astype(np.float64), window)[0]
      for x, y in zip(a, b)
  ]
  return np.mean(shifts, axis=0)


def _crop_costs(yaml_path, size):
  """Single-thread ms per example of each crop: (eval, r50 training augmentation)."""
  dataset = metro_tsv.MetroDataset(yaml_path)
  examples = [dataset.read(i) for i in range(min(_TIMED, len(dataset)))]
  images = [augment.decode_jpeg(ex['jpeg']) for ex in examples]
  rng = np.random.default_rng(0)
  factors = {k: r50.get_config().data[f'{k}_factor'] for k in ('scale', 'rot', 'noise')}
  train_params = [
      augment.sample_params(
          rng,
          scale_factor=factors['scale'],
          rot_factor=factors['rot'],
          noise_factor=factors['noise'],
      )
      for _ in examples
  ]

  def continuous(image, label, params):
    out = augment.process_example(image, label, params, size)
    augment.color_normalize(out['image'], out['pn'])

  def metro(image, label, params):
    metro_crop.image_and_joints_2d(
        image,
        label['center'],
        params.sc * label['scale'],
        label['joints_2d'],
        size,
        params.rot,
        params.flip,
        params.pn,
    )
    augment.label_targets(label, params)

  costs = {}
  for name, fn in (('continuous', continuous), ('metro', metro)):
    for mode, params in (('eval', [augment.AugParams()] * len(examples)), ('train', train_params)):
      start = time.perf_counter()
      for image, ex, p in zip(images, examples, params):
        fn(image, ex['label'], p)
      costs[name, mode] = 1e3 * (time.perf_counter() - start) / len(examples)
  return costs


def main(argv):
  del argv
  augment.single_threaded_opencv()
  yaml_path, where = _test_yaml(_NUM.value)
  rows = []
  for size in (int(s) for s in _SIZES.value):
    metro_img, metro_kp = _eval_examples(yaml_path, size, 'metro', _NUM.value)
    cont_img, cont_kp = _eval_examples(yaml_path, size, 'continuous', _NUM.value)
    diff = np.abs(metro_img - cont_img)
    errors = shift_errors(metro_img, cont_img, _MAX_SHIFT)
    best = min(errors, key=errors.get)
    visible = (metro_kp[..., 2] > 0) & (cont_kp[..., 2] > 0)
    kp = (metro_kp[..., :2] - cont_kp[..., :2])[visible] * size / 2  # [J, 2] crop px
    rows.append(
        {
            'size': size,
            'n': len(metro_img),
            'mean': diff.mean(),
            'max': diff.max(),
            'best': best,
            'best_err': errors[best],
            'phase': phase_shift(metro_img, cont_img),
            'kp_mean': kp.mean(0),
            'kp_abs': np.abs(kp).mean(0),
            'kp_max': np.abs(kp).max(0),
            'joints': len(kp),
            'costs': _crop_costs(yaml_path, size),
        }
    )

  print(f'\nmetro - continuous crop, embedded test set: {where}\n')
  print(
      '| R | images | mean \\|image diff\\| | max \\|image diff\\| | best integer shift '
      '(dx, dy) px | mean \\|diff\\| there | phase-correlation shift (dx, dy) px |'
  )
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(
        f"| {r['size']} | {r['n']} | {r['mean']:.4f} | {r['max']:.3f} | {r['best']} | "
        f"{r['best_err']:.4f} | ({r['phase'][0]:+.2f}, {r['phase'][1]:+.2f}) |"
    )
  print(
      '\n| R | visible joints | mean (dx, dy) px | mean (\\|dx\\|, \\|dy\\|) px | '
      'max (\\|dx\\|, \\|dy\\|) px |'
  )
  print('|---|---|---|---|---|')
  for r in rows:
    print(
        f"| {r['size']} | {r['joints']} | ({r['kp_mean'][0]:+.3f}, {r['kp_mean'][1]:+.3f}) | "
        f"({r['kp_abs'][0]:.3f}, {r['kp_abs'][1]:.3f}) | "
        f"({r['kp_max'][0]:.3f}, {r['kp_max'][1]:.3f}) |"
    )
  print(
      f'\n| R | crop (single thread, {_TIMED} examples, decode excluded) | eval ms/example | '
      'train ms/example (r50 augmentation) |'
  )
  print('|---|---|---|---|')
  for r in rows:
    for name in ('continuous', 'metro'):
      print(
          f"| {r['size']} | {name} | {r['costs'][name, 'eval']:.2f} | "
          f"{r['costs'][name, 'train']:.2f} |"
      )


if __name__ == '__main__':
  app.run(main)
