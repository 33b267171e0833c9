"""Synthetic-data throughput: rendered samples per second per core, and a 10k-set estimate.

  python -m benchmarks.synthetic_render [--num 60] [--image_size 256] [--run 1000]

Prints a markdown table: per-stage CPU milliseconds (medians) and samples/s
per core for the numba and the NumPy-only rasterizer (the JPEG-encoded example
as written to disk, single process, one BLAS thread), then generates `--run`
examples with `--workers` processes through the real CLI path (spawned workers,
TSV writing) and extrapolates the wall time of a 10k-image training set from
that measured run (`--run 10000` measures it). The per-core rates are CPU
time, which other jobs on a shared machine hardly change; the wall times do
depend on them, so the load average is printed beside them.
"""

import os

# One BLAS thread, as in the generator's workers (set before NumPy loads).
for _name in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_name, '1')

import argparse
import tempfile
import time

import cv2
import numpy as np

from coarsemetro_jax import rasterizer
from data_pipelines.synthetic import appearance
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import generate
from data_pipelines.synthetic import pose_sampler
from data_pipelines.synthetic import render


def stage_times(assets, num, image_size, backend):
  """CPU ms per stage (medians) over `num` samples, the same samples for every backend.

  CPU time of this process (`time.process_time`, one thread) rather than wall
  time, so that other jobs on the machine do not count; the wall-clock median
  is reported beside it. The stages are timed on a step-by-step copy of
  `render.render_example`; the total (and the rate) is timed on the real
  `generate.make_example` of the same sample (JPEG included).
  """
  body = assets.body
  size = image_size
  stages = {k: [] for k in ('pose', 'lbs', 'raster', 'shade', 'rest', 'total', 'wall')}
  clock = time.process_time
  for i in range(num):
    rng = generate.example_rng(1234, 'train', i)
    t0 = clock()
    betas = pose_sampler.sample_betas(rng, body.shapedirs.shape[-1])
    pose = render.to_camera_pose(pose_sampler.sample_pose(rng, body.rest_joints(betas)))
    t1 = clock()
    verts, _ = body_np.lbs(body, pose, betas)
    j24 = body.regress('j24_regressor', verts)
    cam = render.sample_camera(rng, verts, size, size)
    uv, depth = render.project(verts, cam)
    verts_cam = verts + cam.trans
    normals_f = render.face_normals(verts_cam, assets.faces)
    t2 = clock()
    face_id = render.rasterize_mesh(
        verts_cam, assets.faces, normals_f, uv, depth, size, size, backend
    )
    t3 = clock()
    albedo = appearance.vertex_albedo(rng, assets.parts)
    normals = render.vertex_normals(normals_f, assets.incidence)
    pix, colour = render.shade(rng, face_id, assets.faces, uv, normals, albedo)
    img = appearance.background(rng, size, size).reshape(-1, 3)
    t4 = clock()
    img[pix] = colour
    img = img.reshape(size, size, 3)
    blur = rng.uniform(0.0, 0.9)
    if blur > 0.3:
      img = cv2.GaussianBlur(img, (0, 0), blur)
    img += render.sensor_noise(rng, img.shape, rng.uniform(0.0, 0.03))
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    uv_j, _ = render.project(j24, cam)
    render.make_label(j24, body.j24_conf, uv_j, uv, pose, betas, size, size)
    render.encode_jpeg(image, rng.integers(*generate.JPEG_QUALITY))
    t5 = clock()
    wall = time.perf_counter()
    generate.make_example(assets, 1234, 'train', i, size, backend)
    t6, wall = clock(), time.perf_counter() - wall
    for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, wall)):
      stages[k].append(1e3 * v)
  out = {k: float(np.median(v)) for k, v in stages.items()}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--num', type=int, default=60, help='samples per backend for the stage table')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--run', type=int, default=1000, help='examples of the measured parallel run')
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  args = p.parse_args()
  assets = generate.load_assets('')
  backends = (['numba'] if rasterizer.HAVE_NUMBA else []) + ['numpy']
  generate.make_example(assets, 0, 'train', 0, args.image_size, backends[0])  # numba JIT
  print(
      f'image {args.image_size}x{args.image_size}, {len(assets.faces)} faces, '
      f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; '
      f'CPU-time medians (ms) over {args.num} samples, one process\n'
  )
  print(
      '| rasterizer | pose+shape | LBS+camera | raster | shade+background | '
      'compose+noise+JPEG+label | total CPU ms | samples/s/core | wall ms (median) |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  cpu_ms = {}
  for backend in backends:
    t = stage_times(assets, args.num, args.image_size, backend)
    cpu_ms[backend] = t['total']
    print(
        f"| {backend} | {t['pose']:.1f} | {t['lbs']:.1f} | {t['raster']:.1f} | "
        f"{t['shade']:.1f} | {t['rest']:.1f} | {t['total']:.1f} | {1e3 / t['total']:.0f} | "
        f"{t['wall']:.1f} |"
    )
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    generate.generate_split(
        assets, tmp, 'train', args.run, 0, args.image_size, args.workers, progress=False
    )
    wall = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
  # Linear in the count; the workers' start-up (a few s) is counted once per run.
  how = 'measured' if args.run >= 10000 else f'extrapolated from {args.run}'
  print(f'\nparallel run through generate_split (load average {load:.1f} before it)\n')
  print('| rasterizer | examples | workers | wall s | examples/s | 10k train set | disk per 10k |')
  print('|---|---|---|---|---|---|---|')
  print(
      f'| {backends[0]} | {args.run} | {args.workers} | {wall:.1f} | {args.run / wall:.0f} | '
      f'{10000 * wall / args.run / 60:.1f} min ({how}) | '
      f'{size / args.run * 1e4 / 2**20:.0f} MiB |'
  )
  busy = min(args.workers, os.cpu_count() or 1)
  print(
      f'\nOn idle cores the same 10k set needs about '
      f'{10000 * cpu_ms[backends[0]] / 1e3 / busy / 60:.1f} min of rendering '
      f"({cpu_ms[backends[0]]:.1f} CPU ms per example over {busy} cores) plus the workers' "
      'start-up; the wall time above also holds whatever else ran on the machine.'
  )


if __name__ == '__main__':
  main()
