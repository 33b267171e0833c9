"""Synthetic-data throughput: rendered samples per second per core, and a 10k-set estimate.

  python benchmarks/synthetic_render.py [--num 60] [--image_size 256] [--run 1000]

Prints a markdown table: per-stage milliseconds (medians) and samples/s on one
core for the numba and the NumPy-only rasterizer (the JPEG-encoded example as
written to disk, single process, one BLAS thread), then generates `--run`
examples with `--workers` processes through the real CLI path (spawned workers,
TSV writing) and extrapolates the wall time of a 10k-image training set from
that measured run. The load average is printed: on a shared machine the
figures are only as good as the idle cores.
"""
import os

# One BLAS thread, as in the generator's workers (set before NumPy loads).
for _name in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_name, '1')

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import tempfile  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top,g-bad-import-order

import numpy as np  # pylint: disable=g-import-not-at-top

from data_pipelines.synthetic import appearance
from data_pipelines.synthetic import body_np
from data_pipelines.synthetic import generate
from data_pipelines.synthetic import pose_sampler
from data_pipelines.synthetic import rasterizer
from data_pipelines.synthetic import render


def stage_times(assets, num, image_size, backend):
  """Median ms per stage over `num` samples (the same samples for every backend)."""
  body = assets.body
  stages = {k: [] for k in ('pose+shape', 'lbs', 'raster', 'shade+bg', 'jpeg', 'total')}
  for i in range(num):
    rng = generate.example_rng(1234, 'train', i)
    t0 = time.perf_counter()
    betas = pose_sampler.sample_betas(rng, body.shapedirs.shape[-1])
    pose = render.to_camera_pose(pose_sampler.sample_pose(rng, body.rest_joints(betas)))
    t1 = time.perf_counter()
    verts, _ = body_np.lbs(body, pose, betas)
    cam = render.sample_camera(rng, verts, image_size, image_size)
    uv, depth = render.project(verts, cam)
    t2 = time.perf_counter()
    verts_cam = verts + cam.trans
    normals_f = render.face_normals(verts_cam, assets.faces)
    face_id = render.rasterize_mesh(verts_cam, assets.faces, normals_f, uv, depth, image_size,
                                    image_size, backend)
    t3 = time.perf_counter()
    albedo = appearance.vertex_albedo(rng, assets.parts)
    normals = render.vertex_normals(normals_f, assets.incidence)
    render.shade(rng, face_id, assets.faces, uv, normals, albedo)
    appearance.background(rng, image_size, image_size)
    t4 = time.perf_counter()
    # The full example (what the generator runs), for the JPEG stage and total.
    t5 = time.perf_counter()
    generate.make_example(assets, 1234, 'train', i, image_size, backend)
    t6 = time.perf_counter()
    for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, 0.0, t6 - t5)):
      stages[k].append(1e3 * v)
  out = {k: float(np.median(v)) for k, v in stages.items()}
  # The fastest tenth: close to an idle core when other jobs share the machine.
  out['total_p10'] = float(np.percentile(stages['total'], 10))
  out['jpeg'] = max(0.0, out['total'] - sum(out[k] for k in ('pose+shape', 'lbs', 'raster', 'shade+bg')))
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
  print(f'image {args.image_size}x{args.image_size}, {len(assets.faces)} faces, '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; '
        f'medians over {args.num} samples, one process\n')
  print('| rasterizer | pose+shape ms | LBS+camera ms | raster ms | shade+bg ms | '
        'other (JPEG, label) ms | total ms | samples/s/core | p10 total ms | p10 samples/s/core |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  rates = {}
  for backend in backends:
    t = stage_times(assets, args.num, args.image_size, backend)
    rates[backend] = 1e3 / t['total']
    print(f"| {backend} | {t['pose+shape']:.1f} | {t['lbs']:.1f} | {t['raster']:.1f} | "
          f"{t['shade+bg']:.1f} | {t['jpeg']:.1f} | {t['total']:.1f} | {rates[backend]:.0f} | "
          f"{t['total_p10']:.1f} | {1e3 / t['total_p10']:.0f} |")
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    generate.generate_split(assets, tmp, 'train', args.run, 0, args.image_size, args.workers,
                            progress=False)
    wall = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
  # Linear in the count; the workers' start-up (a few s) is counted once per run.
  how = 'measured' if args.run >= 10000 else f'extrapolated from {args.run}'
  print(f'\nparallel run through generate_split (load average {load:.1f} before it)\n')
  print('| rasterizer | examples | workers | wall s | examples/s | 10k train set | disk per 10k |')
  print('|---|---|---|---|---|---|---|')
  print(f'| {backends[0]} | {args.run} | {args.workers} | {wall:.1f} | {args.run / wall:.0f} | '
        f'{10000 * wall / args.run / 60:.1f} min ({how}) | {size / args.run * 1e4 / 2**20:.0f} MiB |')

if __name__ == '__main__':
  main()
