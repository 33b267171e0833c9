"""Inference: mesh files, overlays, crops, attention maps and bad inputs."""

import json
import os
import subprocess
import sys

import conftest
import cv2
import jax
import numpy as np
import pytest

from coarsemetro_jax import attention_maps
from coarsemetro_jax import build
from coarsemetro_jax import checkpoints
from coarsemetro_jax import infer
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import mesh_io
from coarsemetro_jax import mesh_topology
from coarsemetro_jax import visualize
from coarsemetro_jax.convert import orbax_variables
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name='coarsemetro'):
  config = tiny.get_config(name)
  if not os.path.exists(mesh_topology.EMBEDDED_HIERARCHY):
    config.topology.hierarchy = str(conftest.SMPL_TOPOLOGY_DIR / 'mesh_downsampling.npz')
  return config


def random_variables(model, image_size, seed=0):
  """Random weights without compiling `init`: params N(0, 0.05), BN identity.

  The camera head is set to s = 0.8, t = (0.1, -0.05), so the mesh lands
  inside the crop, and the xyz head is larger, so it covers much of it.
  """
  abstract = infer.abstract_variables(model, image_size)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'batch_stats' in name:
      return np.full(leaf.shape, 1.0 if name.endswith("['var']") else 0.0, leaf.dtype)
    if 'cam_predictor' in name:
      return (
          np.zeros(leaf.shape, leaf.dtype)
          if name.endswith("['kernel']")
          else np.array([0.8, 0.1, -0.05], leaf.dtype)
      )
    scale = 0.5 if 'xyz_regressor' in name else 0.05  # a mesh of ~ crop size
    return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, dict(abstract))


def random_regressor(num_vertices, seed=0):
  w = np.random.default_rng(seed).random((17, num_vertices)).astype(np.float32)
  return w / w.sum(1, keepdims=True)


@pytest.fixture(scope='module')
def tiny_checkpoint(topology, tmp_path_factory):
  del topology  # skips when no mesh hierarchy is available
  config = tiny_config()
  model = build.build(config, body=False).model
  variables = random_variables(model, config.data.image_size)
  path = str(tmp_path_factory.mktemp('ckpt') / 'tiny')
  orbax_variables.save_converted(
      path, variables, {'kind': 'test', 'scope': 'model', 'model': config.model.to_dict()}
  )
  return config, path


def write_image(path, image):
  assert cv2.imwrite(str(path), image)
  return str(path)


# ---------------------------------------------------------------------------
# Mesh files.


def test_obj_ply_round_trip(topology, tmp_path):
  faces = topology.faces[0]
  vertices = np.random.default_rng(0).normal(size=(6890, 3)).astype(np.float32)
  mesh_io.write_obj(tmp_path / 'm.obj', vertices, faces)
  mesh_io.write_ply(tmp_path / 'm.ply', vertices, faces)
  for read in (mesh_io.read_obj(tmp_path / 'm.obj'), mesh_io.read_ply(tmp_path / 'm.ply')):
    v, f = read
    assert v.shape == (6890, 3) and f.shape == (13776, 3)
    np.testing.assert_array_equal(v, vertices)  # float32 exact in both formats
    np.testing.assert_array_equal(f, faces)
  # The PLY layout, read without our reader: header, float32 xyz, (3, i, j, k).
  data = (tmp_path / 'm.ply').read_bytes()
  header, body = data.split(b'end_header\n', 1)
  assert b'element vertex 6890' in header and b'element face 13776' in header
  assert len(body) == 6890 * 12 + 13776 * 13
  np.testing.assert_array_equal(np.frombuffer(body[:12], '<f4'), vertices[0])
  assert body[6890 * 12] == 3
  np.testing.assert_array_equal(
      np.frombuffer(body[6890 * 12 + 1 : 6890 * 12 + 13], '<i4'), faces[0]
  )
  lines = (tmp_path / 'm.obj').read_text().splitlines()
  assert sum(l.startswith('v ') for l in lines) == 6890
  assert lines[-1] == 'f ' + ' '.join(str(i + 1) for i in faces[-1])


# ---------------------------------------------------------------------------
# Pictures.


def ellipsoid(radii, n_lat=24, n_lon=48):
  """UV ellipsoid: vertices [V, 3] (poles on the y axis) and faces [F, 3]."""
  lat = np.linspace(0, np.pi, n_lat + 1)[1:-1]
  lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
  ring = np.stack(
      [
          np.sin(lat)[:, None] * np.cos(lon),
          np.cos(lat)[:, None] + 0 * lon,
          np.sin(lat)[:, None] * np.sin(lon),
      ],
      -1,
  ).reshape(-1, 3)
  vertices = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * np.asarray(radii)
  idx = lambda i, j: 1 + i * n_lon + j % n_lon
  faces = [(0, idx(0, j), idx(0, j + 1)) for j in range(n_lon)]
  for i in range(n_lat - 2):
    for j in range(n_lon):
      faces += [
          (idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)),
          (idx(i, j), idx(i + 1, j + 1), idx(i, j + 1)),
      ]
  last = len(vertices) - 1
  faces += [(last, idx(n_lat - 2, j + 1), idx(n_lat - 2, j)) for j in range(n_lon)]
  return vertices, np.array(faces)


def mask_box(mask):
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def pixel_box(points):
  """Pixels whose centres (i + 0.5) lie inside the points' bounding box."""
  lo = np.ceil(points.min(0) - 0.5)
  hi = np.floor(points.max(0) - 0.5)
  return np.array([lo[0], lo[1], hi[0], hi[1]])


def test_overlay_covers_the_projected_mesh():
  size, cam = 96, np.array([0.8, 0.1, -0.05])
  vertices, faces = ellipsoid((0.6, 0.9, 0.15))
  background = np.zeros((size, size, 3), np.uint8)
  overlay = visualize.render_mesh(vertices, cam, faces, background)
  # Hand-computed: x in [-0.6, 0.6] -> (0.8 (x + 0.1) + 1) * 48 = [28.8, 74.88] px.
  np.testing.assert_allclose(visualize.project(vertices, cam, size)[:, 0].min(), 28.8)
  box = mask_box(overlay.any(-1))
  expected = pixel_box(visualize.project(vertices, cam, size))
  np.testing.assert_array_equal(box, expected)
  # Side view: turned 90 degrees, the mesh is as wide as it was deep (0.3).
  side = visualize.side_view(vertices, cam, faces, size)
  side_box = mask_box((side != visualize.SIDE_BACKGROUND).any(-1))
  assert side_box[1] == box[1] and side_box[3] == box[3]
  assert abs((side_box[2] - side_box[0] + 1) - 0.8 * 0.3 * 48) <= 1.5
  # Grid: rows of crop | overlay | side view.
  grid = visualize.prediction_grid(
      np.stack([background] * 2), np.stack([vertices] * 2), np.stack([cam] * 2), faces
  )
  assert grid.shape == (2 * size, 3 * size, 3)
  np.testing.assert_array_equal(grid[size:, size : 2 * size], overlay)


def test_visualize_needs_neither_jax_nor_tensorflow():
  code = (
      'import sys; sys.modules.update(jax=None, tensorflow=None); '
      'from coarsemetro_jax import visualize'
  )
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert proc.returncode == 0, proc.stderr


def test_denormalize_inverts_the_input_normalisation():
  image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(visualize.denormalize(infer.normalize(image)), image)


# ---------------------------------------------------------------------------
# End to end on a tiny model.


def test_run_writes_meshes_joints_and_pictures(tiny_checkpoint, topology, tmp_path):
  config, checkpoint = tiny_checkpoint
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  write_image(folder / 'a.png', rng.integers(0, 256, (80, 70, 3), dtype=np.uint8))
  write_image(folder / 'b.jpg', rng.integers(0, 256, (60, 60), dtype=np.uint8))
  write_image(folder / 'c.png', rng.integers(0, 256, (90, 90, 3), dtype=np.uint8))
  (folder / 'broken.png').write_bytes(b'\x89PNG truncated')
  write_image(folder / 'dot.png', np.full((1, 1, 3), 128, np.uint8))  # a 1 x 1 image
  boxes = tmp_path / 'boxes.json'
  boxes.write_text(json.dumps({'c.png': [10, 10, 50, 60], 'a.png': [-10, 5, 40, 70]}))
  regressor = random_regressor(6890)
  spec = attention_maps.AttentionSpec(
      vertex_tokens=(2, 43), joint_tokens=(0, 13), decoder_layers=(0, 2)
  )
  out = tmp_path / 'out'
  result = infer.run(
      config,
      checkpoint,
      [str(folder)],
      str(out),
      bboxes_json=str(boxes),
      batch_size=2,
      attention=spec,
      h36m_regressor=regressor,
      progress=False,
  )
  # Bad images are reported; the others are processed (two batches, the last padded).
  assert result.written == ['a', 'b', 'c']
  assert [p for p, _ in result.failures] == [str(folder / 'broken.png'), str(folder / 'dot.png')]
  assert 'not a readable image' in result.failures[0][1]
  assert result.failures[1][1] == (
      f'{folder / "dot.png"}: the image is 1 x 1 px; at least ' '32 px on each side is needed'
  )
  assert not (out / 'dot.obj').exists()
  faces = topology.faces[0]
  for stem in result.written:
    record = json.loads((out / f'{stem}.json').read_text())
    vertices, obj_faces = mesh_io.read_obj(out / f'{stem}.obj')
    np.testing.assert_array_equal(mesh_io.read_ply(out / f'{stem}.ply')[0], vertices)
    np.testing.assert_array_equal(obj_faces, faces)
    # Pelvis-centred mesh; joints are the regressor's J14 of that mesh.
    j17 = regressor @ vertices.astype(np.float64)
    np.testing.assert_allclose(j17[joint_tables.H36M_PELVIS], 0, atol=1e-5)
    np.testing.assert_allclose(
        record['joints_3d'], j17[list(joint_tables.H36M_J17_TO_J14)], atol=1e-5
    )
    cam = np.array([record['camera'][k] for k in ('s', 'tx', 'ty')])
    np.testing.assert_allclose(cam, [0.8, 0.1, -0.05], atol=1e-6)
    np.testing.assert_allclose(
        record['joints_2d_crop'],
        cam[0] * (np.array(record['joints_3d'])[:, :2] + cam[1:]),
        atol=1e-5,
    )
    # The overlay panel differs from the crop exactly over the projected mesh.
    picture = cv2.cvtColor(cv2.imread(str(out / f'{stem}.png')), cv2.COLOR_BGR2RGB)
    size = config.data.image_size
    assert picture.shape == (size, 3 * size, 3)
    crop, overlay = picture[:, :size].astype(int), picture[:, size : 2 * size].astype(int)
    covered = np.abs(overlay - crop).max(-1) > 2
    face_id, _ = visualize.rasterize_mesh(vertices, cam, faces, size)
    iou = (covered & (face_id >= 0)).sum() / (covered | (face_id >= 0)).sum()
    assert covered.sum() > 200 and iou > 0.97, (stem, iou)
    box, outer = mask_box(covered), pixel_box(visualize.project(vertices, cam, size))
    assert (box[:2] >= outer[:2] - 1).all() and (box[2:] <= outer[2:] + 1).all(), stem
    panel = cv2.imread(str(out / f'{stem}_attention.png'))
    # Row 1: crop + 2 layers x (2 vertex + 2 joint) maps; row 2: 3 encoder layers.
    assert panel.shape == (2 * size, 9 * size, 3)
  a = json.loads((out / 'a.json').read_text())
  assert a['bbox'] == [-10, 5, 40, 70] and a['crop']['side'] == pytest.approx(84)
  b = json.loads((out / 'b.json').read_text())
  assert b['bbox'] is None and 'grayscale image replicated to RGB' in b['notes']


def test_attention_maps_are_head_averaged_rows(topology):
  del topology  # skips when no mesh hierarchy is available
  config = tiny_config()
  model = build.build(config, body=False).model
  variables = infer.abstract_variables(model, config.data.image_size)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)
  # The model's tree of sown weights (no compilation), filled with random rows.
  shapes = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=['intermediates'])[1]['intermediates'],
      variables,
      images,
  )
  rng = np.random.default_rng(0)
  inter = jax.tree.map(lambda s: rng.dirichlet(np.ones(s.shape[-1]), s.shape[:-1]), shapes)
  spec = attention_maps.AttentionSpec(
      vertex_tokens=(5,), joint_tokens=(3,), decoder_layers=(1,), encoder_layers=(2,)
  )
  maps = attention_maps.select(inter, spec)
  enc = np.asarray(
      inter['transformer_3']['encoder']['layers_0']['self_attn']['attention_weights'][0]
  )  # [B, H, 1+N, 1+N]
  dec = np.asarray(
      inter['transformer_2']['decoder']['layers_0']['multihead_attn']['attention_weights'][0]
  )  # [B, H, 14+192, 1+N]
  np.testing.assert_allclose(maps['camera'][:, 0], enc.mean(1)[:, 0, 1:], rtol=1e-6)
  np.testing.assert_allclose(maps['camera_self'][:, 0], enc.mean(1)[:, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(maps['vertex'][:, 0, 0], dec.mean(1)[:, 14 + 5, 1:], rtol=1e-6)
  np.testing.assert_allclose(maps['joint'][:, 0, 0], dec.mean(1)[:, 3, 1:], rtol=1e-6)
  with pytest.raises(
      ValueError,
      match='vertex tokens \\[48\\] do not exist in decoder ' 'layer 0, which has 48 vertex tokens',
  ):
    attention_maps.select(inter, attention_maps.AttentionSpec(vertex_tokens=(48,)))
  with pytest.raises(ValueError, match='decoder layer 3 does not exist: the model has 3'):
    attention_maps.select(inter, attention_maps.AttentionSpec(decoder_layers=(3,)))


# ---------------------------------------------------------------------------
# Checkpoints.


def test_checkpoint_of_another_config(tiny_checkpoint):
  _, checkpoint = tiny_checkpoint
  config = tiny_config('fastmetro')
  model = build.build(config, body=False).model
  with pytest.raises(
      checkpoints.CheckpointError, match='(?s)missing in the checkpoint.*fastmetro.*another config'
  ) as e:
    infer.load_variables(config, model, checkpoint)
  # The conversion metadata names the differing config.model fields.
  assert "name: checkpoint 'coarsemetro', --config 'fastmetro'" in str(e.value)
  assert 'dropout' not in str(e.value).split('another config.model')[1]
  with pytest.raises(checkpoints.CheckpointError, match='checkpoint not found') as e:
    infer.load_variables(config, model, checkpoint + '_nope')
  assert 'another config' not in str(e.value)


def test_cli_reports_a_wrong_checkpoint(tiny_checkpoint, tmp_path):
  config, checkpoint = tiny_checkpoint
  image = write_image(tmp_path / 'a.png', np.zeros((8, 8, 3), np.uint8))
  cmd = [
      sys.executable,
      '-m',
      'coarsemetro_jax.infer',
      '--config=configs/tiny.py:fastmetro',
      f'--config.topology.hierarchy={config.topology.hierarchy}',
      f'--checkpoint={checkpoint}',
      '--images',
      image,
      f'--output_dir={tmp_path}',
  ]
  proc = subprocess.run(
      cmd,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert proc.returncode != 0
  assert 'error: cannot load' in proc.stderr and 'another config' in proc.stderr
