"""Generates METRO TSV splits of synthetic examples, in parallel and streaming.

Every example draws from its own Generator seeded by (seed, split, index), so a
split is the same byte for byte whatever the number of worker processes (the
per-example math has no multi-threaded BLAS reductions, see `body_np`), and
train and test never share a random stream. Workers are started with 'spawn'
(the parent may have JAX loaded, which must not be forked) and receive the
JAX-free `render.Assets` once; at most a few chunks are in flight, so memory
stays bounded however large the split. The same code writes hand datasets:
`load_assets(hand=True)` gives `hand_render.HandAssets`, and every function
below renders what its assets are (`hand_render` for hands, `render` for
bodies).
"""

import collections
import contextlib
import multiprocessing
import os
import sys
import time
import types

import cv2
import numpy as np

from data_pipelines import metro_tsv
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import hand_np
from data_pipelines.synthetic import hand_render
from data_pipelines.synthetic import render

SPLIT_IDS = {'train': 0, 'test': 1}
JPEG_QUALITY = (70, 96)
# J24 skeleton drawn on the contact sheet (joint index pairs).
J24_BONES = (
    (0, 1),
    (1, 2),
    (2, 14),
    (14, 3),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (8, 12),
    (12, 9),
    (9, 10),
    (10, 11),
    (12, 13),
    (14, 16),
    (16, 15),
    (15, 12),
)


def load_assets(model_path='', hand=False):
  """Render assets from the body model, or with hand=True the hand model ('' = embedded)."""
  # Imported here: the models are JAX code; workers only get NumPy copies.
  if hand:
    from coarsemetro_jax import hand_model

    right = hand_model.load_hand_model(model_path)
    return hand_render.make_assets(
        hand_np.from_hand_model(right), hand_np.from_hand_model(hand_model.mirror(right))
    )
  from coarsemetro_jax import body_model

  return render.make_assets(body_np.from_body_model(body_model.load_body_model(model_path)))


def is_hand(assets):
  """True for hand assets (`load_assets(hand=True)`)."""
  return isinstance(assets, hand_render.HandAssets)


def example_rng(seed, split, index):
  """The Generator of one example."""
  if split not in SPLIT_IDS:
    raise ValueError(f'unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}')
  key = (SPLIT_IDS[split], int(index))
  return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def make_example(assets, seed, split, index, image_size, backend='auto'):
  """One example as metro_tsv.write_split takes it: key, jpeg, height, width, label."""
  rng = example_rng(seed, split, index)
  if is_hand(assets):
    out = hand_render.render_example(assets, rng, image_size, backend)
    key = f'synthetic_hand_{split}_{index:08d}'
  else:
    out = render.render_example(assets, rng, image_size, image_size, backend)
    key = f'synthetic_{split}_{index:08d}'
  jpeg = render.encode_jpeg(out['image'], rng.integers(*JPEG_QUALITY))
  return {
      'key': key,
      'jpeg': jpeg,
      'height': image_size,
      'width': image_size,
      'label': out['label'],
  }


_WORKER = {}
# One BLAS / OpenMP thread per worker: the workers already fill the cores.
_THREAD_ENV = ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')


@contextlib.contextmanager
def _light_children():
  """Spawned children (started inside the block) start light.

  They inherit 1-thread BLAS settings, and they do not re-run the parent's
  `__main__` script: 'spawn' runs it again in every child (as `__mp_main__`),
  and main.py imports JAX and, through clu, TensorFlow, which the renderer
  needs neither of. The children only need this module's functions, which
  they import by name. With main.py as the parent this took the first
  rendered example from 3.5 to 19 s after the pool started (2 workers, the
  cores shared with another job), once for each split.
  """
  saved = {k: os.environ.get(k) for k in _THREAD_ENV}
  os.environ.update(dict.fromkeys(_THREAD_ENV, '1'))
  parent_main = sys.modules['__main__']
  # multiprocessing.spawn reads __main__'s __spec__ / __file__ when a child starts.
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = parent_main
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _init_worker(assets, seed, split, image_size, backend):
  _WORKER.update(assets=assets, seed=seed, split=split, image_size=image_size, backend=backend)


def _render_chunk(bounds):
  w = _WORKER
  return [
      make_example(w['assets'], w['seed'], w['split'], i, w['image_size'], w['backend'])
      for i in range(*bounds)
  ]


def iter_examples(assets, split, num, seed, image_size, workers=1, backend='auto', chunk=16):
  """Yields the examples of a split in index order (parallel when workers > 1)."""
  workers = min(workers, -(-num // chunk))  # No idle processes for small splits.
  if workers <= 1:
    for i in range(num):
      yield make_example(assets, seed, split, i, image_size, backend)
    return
  bounds = [(s, min(s + chunk, num)) for s in range(0, num, chunk)]
  ctx = multiprocessing.get_context('spawn')
  with _light_children():  # The workers start here.
    pool = ctx.Pool(
        workers, initializer=_init_worker, initargs=(assets, seed, split, image_size, backend)
    )
  with pool:
    pending = collections.deque()
    todo = iter(bounds)
    for b in todo:  # Keep at most 2 chunks per worker in flight.
      pending.append(pool.apply_async(_render_chunk, (b,)))
      if len(pending) >= 2 * workers:
        break
    while pending:
      result = pending.popleft().get()
      nxt = next(todo, None)
      if nxt is not None:
        pending.append(pool.apply_async(_render_chunk, (nxt,)))
      yield from result


def _progress(iterable, total, desc, every_s=1.0):
  """Passes `iterable` through, printing `desc: n/total, rate, ETA` to stderr."""
  start = last = time.monotonic()
  done = 0
  for done, x in enumerate(iterable, 1):
    yield x
    now = time.monotonic()
    if now - last >= every_s or done == total:
      last = now
      rate = done / max(now - start, 1e-9)
      eta = (total - done) / rate if rate > 0 else 0.0
      print(
          f'\r{desc}: {done}/{total} ({100 * done / max(total, 1):.0f}%), '
          f'{rate:.1f} img/s, ETA {eta:.0f} s   ',
          end='',
          file=sys.stderr,
          flush=True,
      )
  print(
      f'\r{desc}: {done}/{total} in {time.monotonic() - start:.1f} s' + ' ' * 30,
      file=sys.stderr,
      flush=True,
  )


def generate_split(
    assets,
    out_dir,
    split,
    num,
    seed,
    image_size=256,
    workers=1,
    backend='auto',
    progress=True,
    keep_first=0,
    chunk=16,
):
  """Writes DIR/{split}.* (METRO TSV) with `num` examples.

  Returns:
    (yaml path, the first `keep_first` examples) - the latter for a contact sheet.
  """
  kept = []

  def stream():
    examples = iter_examples(assets, split, num, seed, image_size, workers, backend, chunk)
    if progress:
      examples = _progress(examples, num, f'{split}')
    for ex in examples:
      if len(kept) < keep_first:
        kept.append(ex)
      yield ex

  yaml_path = metro_tsv.write_split(out_dir, split, stream(), hand=is_hand(assets))
  return yaml_path, kept


def draw_joints(image, joints_2d):
  """Copy of an RGB image with the J24 skeleton and visible joints drawn on it."""
  img = np.ascontiguousarray(image).copy()
  scale = max(1, round(img.shape[0] / 256))
  j = np.asarray(joints_2d)
  for a, b in J24_BONES:
    if j[a, 2] > 0 and j[b, 2] > 0:
      cv2.line(
          img,
          tuple(int(round(v)) for v in j[a, :2]),
          tuple(int(round(v)) for v in j[b, :2]),
          (255, 255, 255),
          scale,
          cv2.LINE_AA,
      )
  for i, (x, y, vis) in enumerate(j):
    if vis > 0:
      colour = (255, 40, 40) if i in (0, 1, 2, 6, 7, 8) else (40, 120, 255)  # right red, rest blue
      cv2.circle(img, (int(round(x)), int(round(y))), 2 * scale, colour, -1, cv2.LINE_AA)
  return img


def contact_sheet(examples, path, cols=4, tile=None):
  """Writes a PNG grid of examples with their 2D joints drawn; returns the path.

  Labels with 21 joints get the hand skeleton, J24 labels the body's.
  """
  tiles = []
  for ex in examples:
    img = cv2.imdecode(np.frombuffer(ex['jpeg'], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    j2d = np.array(ex['label']['2d_joints'], np.float64)
    if tile:  # Resize first, so the skeleton is drawn sharp at the tile size.
      j2d[:, :2] = (j2d[:, :2] + 0.5) * (tile / np.array(img.shape[1::-1])) - 0.5
      img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
    draw = hand_render.draw_joints if len(j2d) == hand_render.NUM_HAND_JOINTS else draw_joints
    tiles.append(draw(img, j2d))
  if not tiles:
    raise ValueError('contact_sheet needs at least one example')
  rows = -(-len(tiles) // cols)
  h, w = tiles[0].shape[:2]
  sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, cols)
    sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = t
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if not cv2.imwrite(os.fspath(path), sheet[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9]):
    raise OSError(f'could not write the contact sheet {path}')
  return path
