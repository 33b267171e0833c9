"""METRO TSV writer and reader: round trips, METRO compatibility, bad input."""

import base64
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from data_pipelines import metro_labels
from data_pipelines import metro_tsv


def _label(rng, i):
  return {
      'center': [50.0 + i, 40.0],
      'scale': 0.4 + 0.01 * i,
      # [1, 24, 3], as some METRO generators write it.
      '2d_joints': [np.c_[rng.uniform(0, 80, (24, 2)), np.ones(24)].tolist()],
      'has_2d_joints': 1,
      '3d_joints': np.c_[rng.normal(0, 0.3, (24, 3)), np.ones(24)].tolist(),
      'has_3d_joints': 1,
      'pose': rng.normal(0, 0.2, 72).tolist(),
      'betas': [float(i)] * 10,
      'has_smpl': 1,
      'gender': 'm',
  }


def _jpeg(rng, height=60, width=80):
  img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
  return cv2.imencode('.jpg', img)[1].tobytes()


def _examples(n, seed=0, prefix='img'):
  rng = np.random.default_rng(seed)
  for i in range(n):
    yield {
        'key': f'{prefix}_{i:03d}',
        'jpeg': _jpeg(rng),
        'height': 60,
        'width': 80,
        'label': _label(rng, i),
    }


def _metro_seek(tsv, row):
  """METRO's TSVFile.seek: lineidx offset, text readline, split, strip."""
  idx = os.path.splitext(tsv)[0] + '.lineidx'
  with open(idx) as f:
    offsets = [int(line.strip()) for line in f]
  with open(tsv) as f:
    f.seek(offsets[row])
    return [s.strip() for s in f.readline().split('\t')]


def test_write_split_is_read_by_metro_code(tmp_path):
  examples = list(_examples(4))
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', iter(examples))
  with open(yaml_path) as f:
    cfg = yaml.safe_load(f)
  assert cfg == {
      'img': 'train.img.tsv',
      'hw': 'train.hw.tsv',
      'label': 'train.label.tsv',
      'linelist': 'train.linelist.tsv',
  }
  for name in ('img', 'hw', 'label', 'linelist'):
    assert (tmp_path / f'train.{name}.lineidx').exists()
  assert not list(tmp_path.glob('*.tmp'))
  with open(tmp_path / 'train.linelist.tsv') as f:
    assert [int(line) for line in f] == [0, 1, 2, 3]
  for row in (3, 0, 2):
    ex = examples[row]
    key, b64 = _metro_seek(str(tmp_path / 'train.img.tsv'), row)
    assert key == ex['key']
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.imdecode(np.frombuffer(ex['jpeg'], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, expected)
    key, hw = _metro_seek(str(tmp_path / 'train.hw.tsv'), row)
    assert json.loads(hw)[0] == {'height': 60, 'width': 80}
    key, lab = _metro_seek(str(tmp_path / 'train.label.tsv'), row)
    assert key == ex['key']
    assert json.loads(lab)[0] == ex['label']


def test_lineidx_offsets_are_row_starts(tmp_path):
  path = str(tmp_path / 'a.tsv')
  rows = [('k0', 'x'), ('k1', 'üñí'), ('k2', '')]
  assert metro_tsv.write_tsv(path, rows) == 3
  data = open(path, 'rb').read()
  starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord('\n')][:-1]
  with open(tmp_path / 'a.lineidx') as f:
    assert [int(v) for v in f] == starts
  np.testing.assert_array_equal(metro_tsv.compute_offsets(path), starts)


def test_write_tsv_is_atomic(tmp_path):
  path = str(tmp_path / 'a.tsv')
  metro_tsv.write_tsv(path, [('old', '1')])

  def rows():
    yield ('new', '1')
    raise RuntimeError('generator died')

  with pytest.raises(RuntimeError):
    metro_tsv.write_tsv(path, rows())
  assert open(path).read() == 'old\t1\n'  # the old file is untouched
  assert sorted(os.listdir(tmp_path)) == ['a.lineidx', 'a.tsv']
  with pytest.raises(ValueError, match='tab or newline'):
    metro_tsv.write_tsv(path, [('k', 'a\tb')])


@pytest.mark.parametrize(
    'change, match',
    [
        (lambda ex: ex['label'].pop('betas'), 'missing'),
        (lambda ex: ex['label'].update(scale=float('nan')), 'scale'),
        (lambda ex: ex['label']['3d_joints'][3].__setitem__(0, float('nan')), '3d_joints'),
        (lambda ex: ex.update(jpeg=b'not a jpeg'), 'JPEG marker'),
        (lambda ex: ex.update(key='a b\t'), 'key'),
    ],
)
def test_write_split_rejects_bad_examples(tmp_path, change, match):
  examples = list(_examples(3))
  change(examples[1])
  with pytest.raises(ValueError, match=match):
    metro_tsv.write_split(str(tmp_path), 'bad', examples)
  assert not os.path.exists(tmp_path / 'bad.img.tsv')
  assert not os.path.exists(tmp_path / 'bad.yaml')


def test_reader_single_dataset_with_linelist(tmp_path):
  examples = list(_examples(5))
  yaml_path = metro_tsv.write_split(str(tmp_path), 'val', examples)
  # Keep rows 4, 1, 3 only (METRO: the linelist picks and orders the rows).
  metro_tsv.write_tsv(str(tmp_path / 'val.linelist.tsv'), [('4',), ('1',), ('3',)])
  ds = metro_tsv.MetroDataset(yaml_path)
  assert len(ds) == 3
  for i, row in enumerate((4, 1, 3)):
    ex = ds.read(i)
    assert ex['key'] == examples[row]['key']
    assert ex['jpeg'] == examples[row]['jpeg']
    lab = examples[row]['label']
    np.testing.assert_allclose(ex['label']['joints_2d'], lab['2d_joints'][0], rtol=1e-6)
    np.testing.assert_allclose(ex['label']['joints_3d'], lab['3d_joints'], rtol=1e-6)
    np.testing.assert_allclose(ex['label']['pose'], lab['pose'], rtol=1e-6)
    assert ex['label']['betas'][0] == row
    assert ex['label']['scale'] == lab['scale']  # float64, as the JSON holds it
    assert ds.location(i) == (str(tmp_path / 'val.img.tsv'), row)


def test_reader_composite_dataset(tmp_path):
  a = list(_examples(3, seed=1, prefix='a'))
  b = list(_examples(4, seed=2, prefix='b'))
  metro_tsv.write_split(str(tmp_path / 'A'), 'train', a)
  metro_tsv.write_split(str(tmp_path / 'B'), 'train', b)
  order = [(1, 3), (0, 0), (1, 0), (0, 2)]
  metro_tsv.write_tsv(str(tmp_path / 'train.linelist.tsv'), [(str(s), str(r)) for s, r in order])
  with open(tmp_path / 'train.yaml', 'w') as f:
    yaml.safe_dump(
        {
            'composite': True,
            'img': ['A/train.img.tsv', 'B/train.img.tsv'],
            'hw': ['A/train.hw.tsv', 'B/train.hw.tsv'],
            'label': ['A/train.label.tsv', 'B/train.label.tsv'],
            'linelist': 'train.linelist.tsv',
        },
        f,
    )
  ds = metro_tsv.MetroDataset(str(tmp_path / 'train.yaml'))
  assert len(ds) == 4
  for i, (s, r) in enumerate(order):
    want = (a, b)[s][r]
    got = ds.read(i)
    assert got['key'] == want['key'] and got['jpeg'] == want['jpeg']
    assert got['label']['betas'][0] == r


def test_missing_lineidx_is_regenerated(tmp_path):
  examples = list(_examples(3))
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', examples)
  idx = tmp_path / 'train.img.lineidx'
  original = idx.read_text()
  idx.unlink()
  ds = metro_tsv.MetroDataset(yaml_path)
  assert idx.read_text() == original
  assert ds.read(2)['key'] == examples[2]['key']


def test_parse_label_conventions():
  rng = np.random.default_rng(0)
  lab = _label(rng, 0)
  lab['3d_joints'] = [lab['3d_joints']]  # [1, 24, 4]: squeezed like METRO
  out = metro_labels.parse_label(lab)
  assert out['joints_3d'].shape == (24, 4)
  assert out['joints_2d'].shape == (24, 3)
  assert out['has_2d_joints'] == out['has_3d_joints'] == out['has_smpl'] == 1
  # Missing optional fields -> zeros and has_* = 0.
  minimal = metro_labels.parse_label({'center': [1, 2], 'scale': 1.0})
  for name, shape in (
      ('joints_2d', (24, 3)),
      ('joints_3d', (24, 4)),
      ('pose', (72,)),
      ('betas', (10,)),
  ):
    np.testing.assert_array_equal(minimal[name], np.zeros(shape))
  assert minimal['has_2d_joints'] == minimal['has_smpl'] == 0
  # Betas without pose cannot be used: has_smpl drops to 0.
  assert metro_labels.parse_label({**lab, 'pose': None})['has_smpl'] == 0
  # A NaN in a field whose flag is 0 becomes a zero, invisible joint.
  lab2 = _label(rng, 1)
  lab2['has_2d_joints'] = 0
  lab2['2d_joints'][0][5][0] = float('nan')
  out2 = metro_labels.parse_label(lab2)
  np.testing.assert_array_equal(out2['joints_2d'][5], [0, 0, 0])
  assert out2['joints_2d'][4, 2] == 1
  lab2['has_2d_joints'] = 1
  with pytest.raises(ValueError, match='2d_joints'):
    metro_labels.parse_label(lab2)
  with pytest.raises(ValueError, match='shape'):
    metro_labels.parse_label({**lab, 'betas': [0.0] * 9})
  with pytest.raises(ValueError, match='center'):
    metro_labels.parse_label({'scale': 1.0})


def _corrupt_row(tmp_path, kind, row, value):
  """Rewrites one row of train.{kind}.tsv (regenerating its .lineidx)."""
  path = tmp_path / f'train.{kind}.tsv'
  lines = path.read_text().splitlines()
  lines[row] = value(lines[row])
  metro_tsv.write_tsv(str(path), [tuple(line.split('\t')) for line in lines])


@pytest.mark.parametrize(
    'kind, value, match',
    [
        ('img', lambda l: l[:20] + '%%%' + l[23:], 'base64'),
        ('label', lambda l: l[:-5], 'JSON'),
        ('label', lambda l: l.replace('"scale": ', '"scale": NaN, "x": '), 'scale'),
        ('label', lambda l: l.split('\t')[0] + '\t[]', 'non-empty'),
        ('label', lambda l: 'other_key\t' + l.split('\t')[1], 'does not match'),
    ],
)
def test_bad_rows_raise_bad_row_error(tmp_path, kind, value, match):
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', _examples(3))
  _corrupt_row(tmp_path, kind, 1, value)
  ds = metro_tsv.MetroDataset(yaml_path)
  ds.read(0)
  ds.read(2)
  with pytest.raises(metro_labels.BadRowError, match=match) as e:
    ds.read(1)
  assert f'train.{kind}.tsv row 1' in str(e.value)


def test_truncated_tsv(tmp_path):
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', _examples(3))
  img = tmp_path / 'train.img.tsv'
  data = img.read_bytes()
  img.write_bytes(data[:-100])  # cut inside the last row: only it is bad
  ds = metro_tsv.MetroDataset(yaml_path)
  ds.read(1)
  with pytest.raises(metro_labels.BadRowError, match='train.img.tsv row 2'):
    ds.read(2)
  last_row = data.rfind(b'\n', 0, len(data) - 1) + 1
  img.write_bytes(data[: last_row - 100])  # the .lineidx no longer fits
  with pytest.raises(ValueError, match='truncated or the .lineidx is stale'):
    metro_tsv.MetroDataset(yaml_path)
  # With a regenerated .lineidx, img and label files disagree on the rows.
  img.write_bytes(data[:last_row])
  (tmp_path / 'train.img.lineidx').unlink()
  with pytest.raises(ValueError, match='train.img.tsv has 2 rows but'):
    metro_tsv.MetroDataset(yaml_path)


def test_bad_files_fail_fast_with_the_path(tmp_path):
  yaml_path = metro_tsv.write_split(str(tmp_path), 'train', _examples(2))
  missing = str(tmp_path / 'nope.yaml')
  with pytest.raises(FileNotFoundError, match=missing):
    metro_tsv.MetroDataset(missing)
  bad = tmp_path / 'bad.yaml'
  bad.write_text('img: [unclosed\n')
  with pytest.raises(ValueError, match='bad.yaml: malformed yaml'):
    metro_tsv.MetroDataset(str(bad))
  bad.write_text('- just a list\n')
  with pytest.raises(ValueError, match='bad.yaml: expected a mapping'):
    metro_tsv.MetroDataset(str(bad))
  cfg = yaml.safe_load(open(yaml_path))
  cfg['label'] = 'wrong/train.label.tsv'
  bad.write_text(yaml.safe_dump(cfg))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'wrong/train.label.tsv')):
    metro_tsv.MetroDataset(str(bad))
  (tmp_path / 'train.linelist.tsv').write_text('0\nzero\n')
  with pytest.raises(ValueError, match='train.linelist.tsv line 2'):
    metro_tsv.MetroDataset(yaml_path)
  (tmp_path / 'train.linelist.tsv').write_text('0\n2\n')
  with pytest.raises(ValueError, match='row 2 is out of range for .*img.tsv'):
    metro_tsv.MetroDataset(yaml_path)


def test_reader_and_augment_do_not_import_tensorflow():
  code = (
      'import sys; from data_pipelines import metro_tsv, augment; '
      'print("tensorflow" in sys.modules)'
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert out.stdout.strip() == 'False'
