r"""Training input pipeline throughput (decode + augment + batch), examples/s.

  python -m benchmarks.input_pipeline --num_parallel_calls=1,2,-1

Writes a temporary METRO TSV dataset of JPEGs with realistic sizes (300-500 px
sides, smooth content plus texture, quality 90; or --dataset_yaml to use real
data), then times `create_train_dataset` for each --num_parallel_calls value
(-1 = tf.data AUTOTUNE) and prints a markdown table, plus the single-thread cost
of each per-example stage.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
import cv2
import numpy as np

from configs import r50
from data_pipelines import augment
from data_pipelines import input_pipeline
from data_pipelines import metro_tsv

_PARALLEL = flags.DEFINE_list(
    'num_parallel_calls', ['1', '2', '-1'], 'map parallelism values to time (-1 = AUTOTUNE)'
)
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 256, 'fixture dataset size')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'host batch size')
_BATCHES = flags.DEFINE_integer('num_batches', 24, 'timed batches per run')
_WARMUP = flags.DEFINE_integer('warmup_batches', 4, 'untimed batches per run')
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'timed windows per run (the ' 'table shows their median and best)'
)
_SIZE = flags.DEFINE_integer('image_size', 224, 'crop side S')
_DTYPE = flags.DEFINE_enum('image_dtype', 'float32', ['float32', 'bfloat16'], 'batch image dtype')
_CV2_THREADS = flags.DEFINE_integer(
    'cv2_threads', -1, 'cv2.setNumThreads value (-1: leave OpenCV default)'
)
_YAML = flags.DEFINE_string('dataset_yaml', '', 'time a real dataset instead')


def _fixture_examples(n, seed=0):
  """JPEGs of natural-image-like size and entropy with plausible labels."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = rng.integers(300, 501, 2)
    low = cv2.resize(
        rng.integers(0, 255, (h // 16, w // 16, 3), np.uint8),
        (int(w), int(h)),
        interpolation=cv2.INTER_CUBIC,
    )
    texture = rng.normal(0, 12, (h, w, 3))
    img = np.clip(low + texture, 0, 255).astype(np.uint8)
    jpeg = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    center = [w / 2 + rng.uniform(-20, 20), h / 2 + rng.uniform(-20, 20)]
    scale = 0.8 * min(h, w) / 200
    yield {
        'key': f'bench_{i:05d}',
        'jpeg': jpeg.tobytes(),
        'height': int(h),
        'width': int(w),
        'label': {
            'center': center,
            'scale': scale,
            '2d_joints': np.c_[np.asarray(center) + rng.normal(0, 40, (24, 2)), np.ones(24)],
            'has_2d_joints': 1,
            '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)],
            'has_3d_joints': 1,
            'pose': rng.normal(0, 0.2, 72),
            'betas': rng.normal(0, 1, 10),
            'has_smpl': 1,
        },
    }


def _stage_costs(yaml_path, size, n=64):
  """Single-thread ms per example of each stage, on the first n rows."""
  dataset = metro_tsv.MetroDataset(yaml_path)
  rng = np.random.default_rng(0)
  times = {
      'read row + base64 + label JSON': 0.0,
      'JPEG decode (cv2)': 0.0,
      'augment (warpAffine + labels)': 0.0,
  }
  n = min(n, len(dataset))
  for i in range(n):
    t0 = time.perf_counter()
    ex = dataset.read(i)
    t1 = time.perf_counter()
    image = augment.decode_jpeg(ex['jpeg'])
    t2 = time.perf_counter()
    augment.process_example(image, ex['label'], augment.sample_params(rng), size)
    t3 = time.perf_counter()
    for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
      times[name] += dt
  return {name: 1e3 * t / n for name, t in times.items()}


def _time_pipeline(data, parallel):
  data.num_parallel_calls = parallel
  ds = input_pipeline.create_train_dataset(data, seed=0, process_index=0, process_count=1)
  it = ds.as_numpy_iterator()
  for _ in range(_WARMUP.value):
    next(it)
  rates = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(it)
    rates.append(_BATCHES.value * data.batch_size / (time.perf_counter() - start))
  return np.median(rates), max(rates)


def main(argv):
  del argv
  if _CV2_THREADS.value >= 0:
    cv2.setNumThreads(_CV2_THREADS.value)
  with tempfile.TemporaryDirectory() as tmp:
    yaml_path = _YAML.value
    if not yaml_path:
      yaml_path = metro_tsv.write_split(tmp, 'bench', _fixture_examples(_NUM_EXAMPLES.value))
    dataset = metro_tsv.MetroDataset(yaml_path)
    jpeg_kb = np.mean([len(dataset.read(i)['jpeg']) for i in range(min(64, len(dataset)))]) / 1024
    data = r50.get_config().data
    data.train_yaml = yaml_path
    data.image_size = _SIZE.value
    data.batch_size = _BATCH.value
    data.image_dtype = _DTYPE.value
    stages = _stage_costs(yaml_path, _SIZE.value)
    rows = [(p, *_time_pipeline(data, int(p))) for p in _PARALLEL.value]

  print(
      f'\nTrain input pipeline, {len(dataset)} examples, mean JPEG '
      f'{jpeg_kb:.0f} KiB, crop {_SIZE.value}, batch {_BATCH.value}, '
      f'{_DTYPE.value}, {os.cpu_count()} CPU cores, cv2 threads '
      f'{cv2.getNumThreads()}\n'
  )
  print('| num_parallel_calls | examples/s (median) | examples/s (best) | ' 'ms/batch (median) |')
  print('|---|---|---|---|')
  for p, median, best in rows:
    print(
        f'| {"AUTOTUNE" if int(p) < 0 else p} | {median:.0f} | {best:.0f} '
        f'| {1e3 * data.batch_size / median:.1f} |'
    )
  print('\n| stage (single thread) | ms/example |')
  print('|---|---|')
  for name, ms in stages.items():
    print(f'| {name} | {ms:.2f} |')
  print(f'| total | {sum(stages.values()):.2f} |')


if __name__ == '__main__':
  app.run(main)
