"""METRO TSV datasets: writer and reader in pure Python/NumPy (no TensorFlow).

The on-disk format is METRO's (MeshTransformer / FastMETRO
`src/utils/tsv_file*.py`, `src/datasets/human_mesh_tsv.py`): files written here
are read unchanged by METRO's code, and METRO's data tars are read here:

  {split}.img.tsv       `key \\t base64(JPEG)`; the reader takes the last column
  {split}.img.lineidx   byte offset of each row, one per line (each tsv has one:
                        `x.img.tsv` -> `x.img.lineidx`)
  {split}.hw.tsv        `key \\t [{"height": H, "width": W}]`
  {split}.label.tsv     `key \\t JSON list`; the first dict is the label (below)
  {split}.linelist.tsv  rows to use: `row` per line, or `source \\t row` for a
                        composite dataset
  {split}.yaml          `img`, `label`, `hw`, `linelist`: paths relative to the
                        yaml's directory. A composite yaml has `composite: true`
                        and lists of `img` / `label` / `hw` paths, one per
                        source.

Label dict (one per image; all joints in the J24 order of `joints.J24_NAMES`):
  center [2] px, scale (box side / 200 px), 2d_joints [24, 3] (or [1, 24, 3]) px
  with a visibility column, 3d_joints [24, 4] (or [1, 24, 4]) metres in the
  camera frame with a confidence column, pose [72] SMPL axis-angle, betas [10],
  has_2d_joints / has_3d_joints / has_smpl in {0, 1}, optional gender (unused).

Pixel convention: `center` and `2d_joints` are original-image pixel coordinates
with pixel centres at integers (OpenCV's convention).

Error policy: a missing file, a malformed yaml or linelist, or a `.lineidx` that
does not fit its tsv raise at construction with the path in the message. A bad
row (corrupt base64, a label that does not parse, NaNs in a used field, a key
mismatch between the img and label files, a truncated row) raises `BadRowError`
naming the file and row, which the input pipeline counts, logs and skips.
"""

import base64
import binascii
import json
import os

from absl import logging
import numpy as np
import yaml

from coarsemetro_jax import joints

NUM_J24 = len(joints.J24_NAMES)
NUM_POSE = 3 * joints.NUM_SMPL_JOINTS
NUM_BETAS = joints.NUM_BETAS
# (label field, has_* flag, shape, parsed name) of the optional label fields.
_OPTIONAL_FIELDS = (
    ('2d_joints', 'has_2d_joints', (NUM_J24, 3), 'joints_2d'),
    ('3d_joints', 'has_3d_joints', (NUM_J24, 4), 'joints_3d'),
    ('pose', 'has_smpl', (NUM_POSE,), 'pose'),
    ('betas', 'has_smpl', (NUM_BETAS,), 'betas'),
)
# Every key METRO's reader indexes (gender is optional).
_LABEL_KEYS = ('center', 'scale', '2d_joints', '3d_joints', 'has_2d_joints',
               'has_3d_joints', 'pose', 'betas', 'has_smpl')


class BadRowError(ValueError):
  """One row of a dataset cannot be used; the message names file and row."""


# ------------------------------------------------------------------- labels


def _flag(label, name):
  """A has_* flag as 0.0 / 1.0; missing -> 0 (that supervision is unused)."""
  value = label.get(name, 0)
  if isinstance(value, (list, tuple)):  # some writers store [1]
    value = value[0] if len(value) == 1 else None
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = None
  if value not in (0.0, 1.0):
    raise ValueError(f'{name} must be 0 or 1, got {label.get(name)!r}')
  return value


def _field(label, name, shape):
  """A label array of `shape` (float32), squeezing a leading 1 as METRO does."""
  value = np.asarray(label[name], dtype=np.float64)
  if value.ndim == len(shape) + 1 and value.shape[0] == 1:
    value = value[0]
  if len(shape) == 1 and value.size == shape[0]:
    value = value.reshape(shape)
  if value.shape != shape:
    raise ValueError(f'{name} has shape {value.shape}, expected {shape}')
  return value


def parse_label(label):
  """Parses one METRO label dict into float32 arrays (the batch fields).

  `center` and `scale` are required and must be finite (scale > 0). A missing
  optional field gives zeros with its has_* flag 0. A field whose flag is 1 must
  be finite. In a field whose flag is 0, non-finite values become 0 (and the
  visibility / confidence of those joints 0), since METRO's 2D loss still reads
  2D joints through their visibility even when has_2d_joints is 0.

  Args:
    label: the dict from the label tsv (lists or arrays).

  Returns:
    dict with center [2], scale [], joints_2d [24, 3], joints_3d [24, 4],
    pose [72], betas [10], has_2d_joints, has_3d_joints, has_smpl [] (float32).

  Raises:
    ValueError: naming the offending field.
  """
  if not isinstance(label, dict):
    raise ValueError(f'label must be a dict, got {type(label).__name__}')
  for name in ('center', 'scale'):
    if name not in label:
      raise ValueError(f'label has no {name!r}')
  center = _field(label, 'center', (2,))
  try:
    scale = float(np.asarray(label['scale'], np.float64).reshape(()))
  except (TypeError, ValueError) as e:
    raise ValueError(f'scale must be a number, got {label["scale"]!r}') from e
  if not np.all(np.isfinite(center)):
    raise ValueError(f'center is not finite: {center.tolist()}')
  if not (np.isfinite(scale) and scale > 0):
    raise ValueError(f'scale must be finite and > 0, got {scale}')

  out = {'center': center.astype(np.float32), 'scale': np.float32(scale)}
  flags = {}
  for field, flag_name, shape, name in _OPTIONAL_FIELDS:
    flag = _flag(label, flag_name) if label.get(field) is not None else 0.0
    # pose and betas share has_smpl: a pose without betas (or vice versa) is
    # unusable for the SMPL losses, so both must be present for it to hold.
    flag = min(flag, flags.get(flag_name, 1.0))
    flags[flag_name] = flag
    if label.get(field) is None:
      out[name] = np.zeros(shape, np.float32)
      continue
    value = _field(label, field, shape)
    bad = ~np.isfinite(value)
    if bad.any():
      if flag:
        raise ValueError(f'{field} has non-finite values while {flag_name}=1')
      # Joints: drop the whole joint (visibility / confidence included).
      value[bad.any(axis=1) if value.ndim == 2 else bad] = 0.0
    out[name] = value.astype(np.float32)
  for flag_name, flag in flags.items():
    out[flag_name] = np.float32(flag)
  return out


def parse_label_text(text):
  """Parses the label column (JSON list; METRO uses its first dict)."""
  try:
    labels = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'label is not valid JSON: {e}') from e
  if isinstance(labels, dict):
    labels = [labels]
  if not isinstance(labels, list) or not labels:
    raise ValueError('label must be a non-empty JSON list of dicts')
  return parse_label(labels[0])


def encode_label(label):
  """Validates a label dict and returns the label column (JSON list of one).

  Every key METRO's reader indexes must be present (gender is optional), and
  the label must parse with `parse_label`; NaN/inf are rejected.
  """
  missing = [k for k in _LABEL_KEYS if k not in label]
  if missing:
    raise ValueError(f'label is missing {missing}; METRO reads all of '
                     f'{list(_LABEL_KEYS)}')
  parse_label(label)
  # NumPy arrays and scalars both have .tolist().
  return json.dumps([label], allow_nan=False, default=lambda v: v.tolist())


# ------------------------------------------------------------------- writer


def lineidx_path(tsv_path):
  """METRO's `.lineidx` name: `a/x.img.tsv` -> `a/x.img.lineidx`."""
  return os.path.splitext(tsv_path)[0] + '.lineidx'


class TsvWriter:
  """Streams rows into a tsv and its `.lineidx`; both appear on `close()`.

  Rows go to temporary files that are renamed into place only when every row
  was written, so a crash never leaves a half-written tsv under the real name.
  Use as a context manager; an exception inside the block discards the files.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self.num_rows = 0
    self._idx_path = lineidx_path(self.path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._tmp = self.path + '.tmp'
    self._idx_tmp = self._idx_path + '.tmp'
    self._fp = open(self._tmp, 'wb')
    self._fidx = open(self._idx_tmp, 'wb')
    self._offset = 0

  def write(self, row):
    """Writes one row (a tuple of str; bytes are decoded as UTF-8)."""
    fields = []
    for field in row:
      if isinstance(field, bytes):
        field = field.decode('utf-8')
      field = str(field)
      if '\t' in field or '\n' in field or '\r' in field:
        raise ValueError(f'{self.path} row {self.num_rows}: a field contains a '
                         'tab or newline')
      fields.append(field)
    line = ('\t'.join(fields) + '\n').encode('utf-8')
    self._fidx.write(b'%d\n' % self._offset)
    self._fp.write(line)
    self._offset += len(line)
    self.num_rows += 1

  def close(self):
    """Moves the finished tsv and `.lineidx` into place."""
    self._fp.close()
    self._fidx.close()
    # Drop an old .lineidx first: a crash between the two renames then leaves
    # a tsv without .lineidx (regenerated by the reader), never a stale one.
    if os.path.exists(self._idx_path):
      os.remove(self._idx_path)
    os.replace(self._tmp, self.path)
    os.replace(self._idx_tmp, self._idx_path)

  def abort(self):
    """Discards the temporary files."""
    self._fp.close()
    self._fidx.close()
    for tmp in (self._tmp, self._idx_tmp):
      if os.path.exists(tmp):
        os.remove(tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_tsv(path, rows):
  """Writes `rows` (iterable of tuples of str) to `path` and its `.lineidx`.

  Returns:
    The number of rows written.
  """
  with TsvWriter(path) as writer:
    for row in rows:
      writer.write(row)
  return writer.num_rows


def _write_text_atomic(path, text):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_split(out_dir, split, examples):
  """Writes one non-composite METRO dataset split, streaming the examples.

  Args:
    out_dir: output directory (created).
    split: file prefix, e.g. 'train' -> train.img.tsv, ..., train.yaml.
    examples: iterable of dicts {key: str, jpeg: bytes, height: int,
      width: int, label: dict (module docstring)}.

  Returns:
    The path of the written `{split}.yaml`.

  Raises:
    ValueError: an example has a bad key, non-JPEG bytes, a bad size or a label
      METRO could not read; nothing is left under the final names.
  """
  os.makedirs(out_dir, exist_ok=True)
  names = {kind: f'{split}.{kind}.tsv'
           for kind in ('img', 'hw', 'label', 'linelist')}
  paths = {kind: os.path.join(out_dir, name) for kind, name in names.items()}
  seen = set()  # keys only; images are streamed
  with TsvWriter(paths['img']) as img, TsvWriter(paths['hw']) as hw, \
       TsvWriter(paths['label']) as lab, TsvWriter(paths['linelist']) as lines:
    for i, ex in enumerate(examples):
      key = ex['key']
      where = f'{split} example {i} (key {key!r})'
      if not isinstance(key, str) or not key or key.strip() != key:
        raise ValueError(f'{where}: key must be a non-empty str without '
                         'surrounding whitespace')
      if key in seen:
        raise ValueError(f'{where}: duplicate key')
      seen.add(key)
      jpeg = bytes(ex['jpeg'])
      if not jpeg.startswith(b'\xff\xd8'):
        raise ValueError(f'{where}: jpeg does not start with a JPEG marker')
      height, width = int(ex['height']), int(ex['width'])
      if height <= 0 or width <= 0:
        raise ValueError(f'{where}: bad size {height}x{width}')
      try:
        label = encode_label(ex['label'])
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from e
      img.write((key, base64.b64encode(jpeg).decode('ascii')))
      hw.write((key, json.dumps([{'height': height, 'width': width}])))
      lab.write((key, label))
      lines.write((str(i),))
  yaml_path = os.path.join(out_dir, f'{split}.yaml')
  _write_text_atomic(yaml_path, yaml.safe_dump(names, sort_keys=False))
  return yaml_path


# ------------------------------------------------------------------- reader


def _read_offsets(path):
  with open(path, 'rb') as f:
    data = f.read().split()
  try:
    return np.array(data, dtype=np.int64)
  except ValueError as e:
    raise ValueError(f'{path}: malformed .lineidx ({e})') from e


def compute_offsets(tsv_path):
  """Byte offset of every row of a tsv (what a `.lineidx` holds)."""
  offsets = []
  pos = 0
  with open(tsv_path, 'rb') as f:
    for line in f:
      offsets.append(pos)
      pos += len(line)
  return np.array(offsets, dtype=np.int64)


def generate_lineidx(tsv_path):
  """Writes the `.lineidx` of a tsv (atomically) and returns its offsets."""
  offsets = compute_offsets(tsv_path)
  idx_path = lineidx_path(tsv_path)
  tmp = idx_path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(b''.join(b'%d\n' % o for o in offsets))
  os.replace(tmp, idx_path)
  return offsets


class TsvFile:
  """Random access to the rows of one tsv through its `.lineidx`.

  Rows are read with `os.pread`, which keeps no shared file position, so one
  TsvFile serves many threads (tf.data's parallel map) at once.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'TSV file not found: {self.path}')
    self.size = os.path.getsize(self.path)
    idx_path = lineidx_path(self.path)
    if os.path.isfile(idx_path):
      self.offsets = _read_offsets(idx_path)
    else:
      logging.warning('%s is missing; regenerating it from %s', idx_path,
                      self.path)
      try:
        self.offsets = generate_lineidx(self.path)
      except OSError as e:  # e.g. a read-only dataset mount
        logging.warning('cannot write %s (%s); keeping offsets in memory',
                        idx_path, e)
        self.offsets = compute_offsets(self.path)
    offsets = self.offsets
    if len(offsets) and (offsets[0] != 0 or np.any(np.diff(offsets) <= 0)
                         or offsets[-1] >= self.size):
      raise ValueError(
          f'{idx_path} does not fit {self.path} ({self.size} bytes, last '
          f'offset {offsets[-1]}): the tsv is truncated or the .lineidx is '
          'stale; delete the .lineidx to regenerate it')
    self._fd = os.open(self.path, os.O_RDONLY)

  def __len__(self):
    return len(self.offsets)

  def read_row(self, row):
    """The fields of one row as stripped bytes (METRO strips every field)."""
    if not 0 <= row < len(self.offsets):
      raise BadRowError(f'{self.path} row {row}: out of range '
                        f'[0, {len(self.offsets)})')
    start = int(self.offsets[row])
    end = (int(self.offsets[row + 1]) if row + 1 < len(self.offsets)
           else self.size)
    data = os.pread(self._fd, end - start, start)
    if len(data) != end - start:
      raise BadRowError(f'{self.path} row {row}: read {len(data)} of '
                        f'{end - start} bytes (file truncated?)')
    # Every row, the last one included, ends with its only newline (METRO's
    # writer); anything else is a stale .lineidx or a truncated file.
    if data.find(b'\n') != len(data) - 1:
      raise BadRowError(f'{self.path} row {row}: the row does not end at the '
                        'next .lineidx offset (truncated file or stale '
                        '.lineidx)')
    return [field.strip() for field in data.split(b'\t')]

  def close(self, _os_close=os.close):
    # `_os_close` is bound early: at interpreter exit `os` may already be gone.
    if getattr(self, '_fd', None) is not None:
      _os_close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()


def load_yaml(path):
  """Loads a dataset yaml; fails with the path on a missing/malformed file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'dataset yaml not found: {path}')
  try:
    with open(path) as f:
      cfg = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ValueError(f'{path}: malformed yaml: {e}') from e
  if not isinstance(cfg, dict):
    raise ValueError(f'{path}: expected a mapping with img/label keys, got '
                     f'{type(cfg).__name__}')
  for key in ('img', 'label'):
    if not cfg.get(key):
      raise ValueError(f'{path}: no {key!r} entry')
  return cfg


def _resolve(root, name, yaml_path, key):
  """A yaml path entry, relative to the yaml's directory; must exist."""
  if not isinstance(name, str):
    raise ValueError(f'{yaml_path}: {key!r} must be a path, got {name!r}')
  path = name if os.path.isabs(name) else os.path.join(root, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{yaml_path}: {key!r} points to a missing file: '
                            f'{path}')
  return path


def _resolve_list(root, names, yaml_path, key):
  """A composite entry: a list of paths, or a file listing them (METRO)."""
  if isinstance(names, str):
    list_path = _resolve(root, names, yaml_path, key)
    with open(list_path) as f:
      names = [line.strip() for line in f if line.strip()]
  if not isinstance(names, list) or not names:
    raise ValueError(f'{yaml_path}: composite {key!r} must be a non-empty list')
  return [_resolve(root, n, yaml_path, key) for n in names]


def _read_linelist(path, composite):
  """Rows of a linelist: [N, 2] int64 (source, row)."""
  rows = []
  with open(path) as f:
    for n, line in enumerate(f):
      parts = line.split('\t')
      if not line.strip():
        continue
      try:
        if composite:
          rows.append((int(parts[0]), int(parts[1])))
        else:
          rows.append((0, int(parts[0])))
      except (ValueError, IndexError) as e:
        want = '`source \\t row`' if composite else 'a row index'
        raise ValueError(f'{path} line {n + 1}: expected {want}, got '
                         f'{line.strip()!r}') from e
  return np.array(rows, dtype=np.int64).reshape(-1, 2)


class MetroDataset:
  """A METRO yaml dataset (single or composite); examples indexed 0..N-1.

  Attributes:
    yaml_path: the yaml.
    img_files, label_files: one TsvFile per source (one unless composite).
    rows: [N, 2] int64, (source, row) of each example (from the linelist).
  """

  def __init__(self, yaml_path):
    self.yaml_path = os.fspath(yaml_path)
    cfg = load_yaml(self.yaml_path)
    root = os.path.dirname(os.path.abspath(self.yaml_path))
    self.composite = bool(cfg.get('composite', False))
    if self.composite:
      img = _resolve_list(root, cfg['img'], self.yaml_path, 'img')
      label = _resolve_list(root, cfg['label'], self.yaml_path, 'label')
      if cfg.get('hw'):
        _resolve_list(root, cfg['hw'], self.yaml_path, 'hw')
      if len(label) != len(img):
        raise ValueError(f'{self.yaml_path}: {len(img)} img files but '
                         f'{len(label)} label files')
      if not cfg.get('linelist'):
        raise ValueError(f'{self.yaml_path}: a composite dataset needs a '
                         "'linelist' of `source \\t row` rows")
    else:
      img = [_resolve(root, cfg['img'], self.yaml_path, 'img')]
      label = [_resolve(root, cfg['label'], self.yaml_path, 'label')]
      if cfg.get('hw'):
        _resolve(root, cfg['hw'], self.yaml_path, 'hw')
    self.img_files = [TsvFile(p) for p in img]
    self.label_files = [TsvFile(p) for p in label]
    for i, (im, lab) in enumerate(zip(self.img_files, self.label_files)):
      if len(im) != len(lab):
        raise ValueError(f'{im.path} has {len(im)} rows but {lab.path} has '
                         f'{len(lab)} (source {i})')
    if cfg.get('linelist'):
      linelist = _resolve(root, cfg['linelist'], self.yaml_path, 'linelist')
      self.rows = _read_linelist(linelist, self.composite)
      where = linelist
    else:
      self.rows = np.stack([np.zeros(len(self.img_files[0]), np.int64),
                            np.arange(len(self.img_files[0]))], axis=1)
      where = self.img_files[0].path
    sources, rows = self.rows[:, 0], self.rows[:, 1]
    if len(self.rows) and (sources.min() < 0
                           or sources.max() >= len(self.img_files)):
      raise ValueError(f'{where}: source index out of range '
                       f'[0, {len(self.img_files)})')
    for s, tsv in enumerate(self.img_files):
      sel = rows[sources == s]
      if len(sel) and (sel.min() < 0 or sel.max() >= len(tsv)):
        raise ValueError(f'{where}: row {sel.max()} is out of range for '
                         f'{tsv.path} ({len(tsv)} rows)')
    if not len(self.rows):
      raise ValueError(f'{self.yaml_path}: the dataset has no rows')

  def __len__(self):
    return len(self.rows)

  def location(self, index):
    """(img tsv path, row) of example `index`, for messages."""
    source, row = self.rows[index]
    return self.img_files[source].path, int(row)

  def read(self, index):
    """Reads example `index`.

    Returns:
      dict(key=str, jpeg=bytes, label=parse_label(...) dict of arrays).

    Raises:
      BadRowError: naming the file and row.
    """
    source, row = (int(v) for v in self.rows[index])
    img_tsv, label_tsv = self.img_files[source], self.label_files[source]
    img_fields = img_tsv.read_row(row)
    label_fields = label_tsv.read_row(row)
    key = img_fields[0].decode('utf-8', 'replace')
    if len(img_fields) < 2:
      raise BadRowError(f'{img_tsv.path} row {row}: no image column')
    if len(label_fields) < 2:
      raise BadRowError(f'{label_tsv.path} row {row}: no label column')
    label_key = label_fields[0].decode('utf-8', 'replace')
    if label_key != key:
      raise BadRowError(f'{label_tsv.path} row {row}: key {label_key!r} does '
                        f'not match {key!r} in {img_tsv.path}')
    try:
      # The last column, as METRO's reader (old files had more columns).
      jpeg = base64.b64decode(img_fields[-1], validate=True)
    except (binascii.Error, ValueError) as e:
      raise BadRowError(f'{img_tsv.path} row {row}: bad base64 ({e})') from e
    try:
      label = parse_label_text(label_fields[1])
    except ValueError as e:
      raise BadRowError(f'{label_tsv.path} row {row}: {e}') from e
    return {'key': key, 'jpeg': jpeg, 'label': label}
