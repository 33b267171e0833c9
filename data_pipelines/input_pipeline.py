"""tf.data input pipelines for METRO-format data (TSV yamls or the TFDS build).

  train_ds = create_train_dataset(config.data, seed=config.seed)  # endless
  eval_ds = create_eval_dataset(config.data)        # finite; len() = batches
  for batch in global_batches(train_ds, batch_sharding):  # jax.Arrays
    ...

Each host reads its own rows (below) and prepares examples in a parallel
`map`, one `tf.numpy_function` per chunk of `examples.ROWS_PER_CALL` rows
(examples.py); for each row: read it, cv2 JPEG decode, the crop of
`config.data.crop` (evaluation) or `train_crop` (training): 'continuous' is one
`cv2.warpAffine` for crop/scale/rotation/flip and the colour noise plus
ImageNet normalisation as one `cv2.LUT`, 'metro' the released METRO/FastMETRO
arithmetic (metro_crop.py); then the label transforms (OpenCV releases the
GIL). It batches `batch_size / process_count` examples per host, and
`to_global_batch` turns a host batch into global arrays with
`jax.make_array_from_process_local_data`.

Training (TSV source, or a TFDS ArrayRecord build): the global batch at step t
is the same whatever the number of hosts (`ordering`: one permutation of all
rows per epoch from (seed, epoch), epochs concatenated, batch t = positions
[tB, (t+1)B)); each host reads and decodes only its own slots of each global
batch (`ordering.process_rows` of the batch sharding; by default the
contiguous block of process p), and a resumed run (`start_step`) computes where
to start instead of reading up to it. Examples are augmented with the §4.3
parameters drawn from `np.random.default_rng((seed, epoch, row))`, where row is
the example's position in its yaml dataset (linelist order; a TFDS example
stores it as 'index'). Keying the parameters on the row rather than the stream
position keeps them independent of the host, read order, parallelism and the
source: a TSV split and its TFDS build give the same batches (when no row was
left out of the build; the TFDS order permutes the build's examples).
An ArrayRecord build (the default of `tfds_metro.Metro`) is read by index
(`tfds_metro.data_source`). A TFRecord build is read in sequence only, so it keeps a
host-local order: each host reads a contiguous 1/process_count slice of the
examples and shuffles it (files plus a `shuffle_buffer`); 1 and N hosts then
train on different batches, and on several hosts the pipeline logs one warning
saying how to copy the build to ArrayRecord (`tfds_metro.Metro(copy_from=...)`).
Evaluation: no augmentation (sc=1, r=0, no flip: the crop box is 200 * scale
around the centre, §6); every example is seen once across hosts (each reads a
contiguous slice); each host pads its stream with `mask`=0 examples up to the
same number of batches.

Bad rows (corrupt base64/JPEG, unusable label, NaNs, truncated rows; see
`metro_tsv`) are counted and logged with their file and row by a
`bad_rows.BadRows` object. In training a bad row keeps its slot as an all-zero
example with `mask` 0, which the losses ignore (it still enters the BatchNorm
batch statistics), so later batches do not shift (and stay host-independent);
in evaluation it is dropped and the host's padding grows by one. Past
`max_bad_fraction` of the host's rows the prepare function stops decoding and
flags its chunks; a TensorFlow assertion then ends the stream (no Python
exception is ever raised inside tf.data), and
`global_batches(..., bad_rows=...)` stops tf.data and raises
`bad_rows.TooManyBadRowsError` with the limit, the count and the last bad rows
in the caller's thread. Missing files and malformed yamls fail when the dataset
is created.
"""

import functools

from absl import logging
import jax
import numpy as np

# TensorFlow is imported only by the tf.data code in data_pipelines (the
# jit-compiled core stays TF-free for accelerator hosts without it).
import tensorflow as tf

from data_pipelines import augment
from data_pipelines import bad_rows as bad_rows_lib
from data_pipelines import examples
from data_pipelines import metro_tsv
from data_pipelines import ordering
from data_pipelines import prefetch

# The assertion that ends a stream past the limit; `BadRows.check` has the details.
_STOP_MESSAGE = (
    'input pipeline: too many bad rows (config.data.max_bad_fraction); '
    'see the bad rows logged above'
)


def _cast_images(batch, dtype):
  return {**batch, 'image': tf.cast(batch['image'], dtype)}


def host_range(num_rows, process_index, process_count):
  """The contiguous rows [start, end) that one host reads."""
  return (
      num_rows * process_index // process_count,
      num_rows * (process_index + 1) // process_count,
  )


def _process_args(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in ' f'[0, {process_count})')
  return process_index, process_count


def _local_batch_size(global_batch_size, process_count, name):
  if global_batch_size % process_count:
    raise ValueError(
        f'config.data.{name}={global_batch_size} is not divisible '
        f'by the number of hosts ({process_count})'
    )
  return global_batch_size // process_count


def _hide_accelerators_from_tf():
  # tf.data runs on the host; a GPU build of TF would otherwise claim the
  # accelerator memory that JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # devices already initialised; nothing to do
    pass


def _dtype(data_config):
  dtypes = {'float32': tf.float32, 'bfloat16': tf.bfloat16}
  if data_config.image_dtype not in dtypes:
    raise ValueError(
        f'config.data.image_dtype must be one of {list(dtypes)}, '
        f'got {data_config.image_dtype!r}'
    )
  return dtypes[data_config.image_dtype]


def _global_order(num_rows, global_batch_size, local_rows, *, seed, shuffle, start_step):
  """Endless (global position, row) of this host's slots (`ordering`), from start_step."""
  start = start_step * global_batch_size

  def one_epoch(epoch):
    positions, rows = tf.numpy_function(
        lambda e: ordering.host_positions(
            num_rows, global_batch_size, local_rows, int(e), seed=seed, shuffle=shuffle, start=start
        ),
        [epoch],
        (tf.int64, tf.int64),
    )
    positions.set_shape([None])
    rows.set_shape([None])
    return tf.data.Dataset.from_tensor_slices((positions, rows))

  return tf.data.Dataset.counter(start // num_rows).flat_map(one_epoch)


def _examples(
    data_config,
    *,
    yaml_path,
    tfds_split,
    train,
    seed,
    process_index,
    process_count,
    shuffle,
    bad_rows,
    start_step=0,
    local_rows=None,
):
  """Host-local stream of chunks of processed rows (and the source size).

  Each element is a dict of [<= examples.ROWS_PER_CALL, ...] tensors in stream order,
  bad rows as `examples.empty_example`s, plus the bad-row `stop` flag; callers keep
  (`_keep_slots`) or drop (`_drop_bad_rows`) the bad rows, then `rebatch`.
  Training on the TSV source (or a TFDS ArrayRecord build) reads the host's
  slots `local_rows` of the global order; otherwise the host reads its
  `host_range`.
  """
  layout = examples.Layout.of(data_config)  # crop size; body or hand rows
  params_fn = examples.params_fn(data_config, seed, train)
  # The map already prepares chunks in parallel; OpenCV's own thread pool on
  # crops this small only adds CPU (its hand-offs cost more than the work).
  augment.single_threaded_opencv()
  parallel = data_config.num_parallel_calls
  parallel = tf.data.AUTOTUNE if parallel < 0 else parallel
  if data_config.source == 'tsv':
    dataset = metro_tsv.MetroDataset(yaml_path, hand=layout.hand)
    num_rows = len(dataset)
    start, end = host_range(num_rows, process_index, process_count)
    bad_rows = _host_bad_rows(bad_rows, end - start, data_config)
    if train:
      # Positions count from the start of the global stream: the example at
      # position g is in epoch g // num_rows. Nothing before start_step is read.
      ds = _global_order(
          num_rows,
          data_config.batch_size,
          local_rows,
          seed=seed,
          shuffle=shuffle,
          start_step=start_step,
      )
      loader = examples.tsv_loader(dataset, bad_rows, params_fn, layout, num_rows)
    else:
      ds = tf.data.Dataset.range(start, end).enumerate()
      loader = examples.tsv_loader(dataset, bad_rows, params_fn, layout, end - start)
  elif data_config.source == 'tfds':
    ds, loader, num_rows = _tfds_examples(
        data_config,
        tfds_split,
        train=train,
        params_fn=params_fn,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        bad_rows=bad_rows,
        start_step=start_step,
        local_rows=local_rows,
    )
  else:
    raise ValueError(f"config.data.source must be 'tsv' or 'tfds', got " f'{data_config.source!r}')
  return ds.batch(examples.ROWS_PER_CALL).map(loader, num_parallel_calls=parallel), num_rows


def _tfds_examples(
    data_config,
    split,
    *,
    train,
    params_fn,
    seed,
    process_index,
    process_count,
    shuffle,
    bad_rows,
    start_step,
    local_rows,
):
  """The TFDS source's (counter, row) stream, its loader and the split size.

  An ArrayRecord build is read by index like the TSVs (training: the global
  order); a TFRecord build in sequence, each host its `host_range`.
  """
  # Imported here: TFDS is needed only for this source.
  from data_pipelines import tfds_metro

  data_dir = data_config.tfds_data_dir
  layout = examples.Layout.of(data_config)
  if layout.hand:
    raise ValueError("config.data.hand: TFDS builds hold body labels; read hands with source='tsv'")
  num_rows = tfds_metro.num_examples(data_dir, split)
  start, end = host_range(num_rows, process_index, process_count)
  bad_rows = _host_bad_rows(bad_rows, end - start, data_config)
  if tfds_metro.file_format(data_dir) == tfds_metro.ARRAY_RECORD.value:
    source = tfds_metro.data_source(data_dir, split)
    if train:
      ds = _global_order(
          num_rows,
          data_config.batch_size,
          local_rows,
          seed=seed,
          shuffle=shuffle,
          start_step=start_step,
      )
      epoch_length = num_rows
    else:
      ds, epoch_length = tf.data.Dataset.range(start, end).enumerate(), end - start
    loader = examples.tfds_index_loader(source, bad_rows, params_fn, layout, split, epoch_length)
    return ds, loader, num_rows
  if train and process_count > 1:
    logging.warning(
        'input pipeline: config.data.tfds_data_dir=%s is a TFRecord build, read in '
        'sequence: each of the %d hosts shuffles its own slice, so the batches differ '
        'from those of another host count; for host-independent batches copy it to an '
        "ArrayRecord build: tfds_metro.Metro(data_dir=NEW_DIR, copy_from='%s')"
        '.download_and_prepare()',
        data_dir,
        process_count,
        data_dir,
    )
  ds = tfds_metro.read_split(
      data_dir, split, start=start, end=end, shuffle_files=shuffle, seed=seed
  )
  if shuffle:
    ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if train:
    ds = ds.repeat()
  # Element k of the host's stream is in epoch k // (end - start). Skipping
  # here costs no decoding (the JPEGs are still undecoded bytes).
  local = len(local_rows) if train else 0
  ds = ds.enumerate().skip(start_step * local)
  loader = examples.tfds_loader(bad_rows, params_fn, layout, split, end - start)
  return ds, loader, num_rows


def _host_bad_rows(bad_rows, num_rows, data_config):
  if bad_rows is None:
    bad_rows = bad_rows_lib.BadRows(max_fraction=data_config.max_bad_fraction)
  if bad_rows.limit is None:
    bad_rows.set_num_rows(num_rows)
  return bad_rows


def _assert_not_stopped(chunk):
  """The chunk without its `stop` flag; a chunk prepared past the bad-row limit fails."""
  chunk = dict(chunk)
  stop = chunk.pop('stop')
  # A native TensorFlow error: a Python one raised in tf.data's threads would
  # reach the host wrapped in a PyFunc traceback, or abort the process.
  with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(stop), [_STOP_MESSAGE])]):
    return {name: tf.identity(value) for name, value in chunk.items()}


def _keep_slots(chunk):
  """Training: bad rows stay as mask-0 examples, so no later example moves."""
  return _assert_not_stopped(chunk)


def _drop_bad_rows(chunk):
  """Evaluation: drops the bad rows of a chunk (the padding replaces them)."""
  chunk = _assert_not_stopped(chunk)
  good = chunk['mask'] > 0
  return {name: tf.boolean_mask(value, good) for name, value in chunk.items()}


def create_train_dataset(
    data_config,
    *,
    seed=0,
    process_index=None,
    process_count=None,
    shuffle=True,
    bad_rows=None,
    start_step=0,
    local_rows=None,
):
  """Endless host-local training batches (batch keys: data_pipelines).

  With the TSV source or a TFDS ArrayRecord build, host p's batch t holds rows
  `local_rows` of global batch t (module docstring, `ordering`), the same for
  any number of hosts.

  Args:
    data_config: config.data (source, train_yaml or tfds fields, image_size,
      batch_size (global), augmentation factors, image_dtype, ...).
    seed: shuffling and augmentation seed.
    process_index, process_count: this host and the number of hosts
      (default: jax.process_index(), jax.process_count()).
    shuffle: a new order every epoch (False: rows in order, for tests).
    bad_rows: optional BadRows to inspect the skipped rows; pass the same one
      to `global_batches`, which raises its error past the limit.
    start_step: resume: start at global batch `start_step`, with nothing
      before it decoded; the batches equal the uninterrupted run's.
    local_rows: this host's slots of a global batch, sorted
      (`ordering.process_rows` of the batch sharding); default the contiguous
      block of process_index. Not for a TFDS TFRecord build (host-local order).

  Returns:
    tf.data.Dataset of dicts of [batch_size / process_count, ...] tensors.
  """
  _hide_accelerators_from_tf()
  if seed < 0:
    raise ValueError(f'seed must be >= 0 (numpy SeedSequence), got {seed}')
  process_index, process_count = _process_args(process_index, process_count)
  local = _local_batch_size(data_config.batch_size, process_count, 'batch_size')
  if local_rows is None:
    local_rows = ordering.contiguous_rows(data_config.batch_size, process_index, process_count)
  local_rows = np.asarray(local_rows, np.int64)
  if (
      len(local_rows) != local
      or np.any(np.diff(local_rows) <= 0)
      or not (0 <= local_rows[0] and local_rows[-1] < data_config.batch_size)
  ):
    raise ValueError(
        f'local_rows must be {local} increasing slots in '
        f'[0, {data_config.batch_size}), got {local_rows.tolist()}'
    )
  ds, _ = _examples(
      data_config,
      yaml_path=data_config.train_yaml,
      tfds_split=data_config.tfds_train_split,
      train=True,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      shuffle=shuffle,
      bad_rows=bad_rows,
      start_step=start_step,
      local_rows=local_rows,
  )
  # Chunks -> full batches (static shapes for jit).
  ds = ds.map(_keep_slots).rebatch(local, drop_remainder=True)
  if _dtype(data_config) != tf.float32:
    ds = ds.map(
        functools.partial(_cast_images, dtype=_dtype(data_config)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
  return ds.prefetch(data_config.prefetch)


def create_eval_dataset(
    data_config,
    *,
    yaml_path=None,
    tfds_split=None,
    process_index=None,
    process_count=None,
    bad_rows=None,
):
  """Finite host-local eval batches; `mask` = 0 marks padding.

  Every example is in exactly one host's batches; all hosts yield the same
  number of batches (`len(dataset)`), as jitted steps over global arrays need.

  Args:
    data_config: config.data.
    yaml_path: dataset yaml (default data_config.eval_yaml; tsv source).
    tfds_split: split name (default data_config.tfds_eval_split; tfds).
    process_index, process_count: as in create_train_dataset.
    bad_rows: optional BadRows.

  Returns:
    tf.data.Dataset of dicts of [eval_batch_size / process_count, ...].
  """
  _hide_accelerators_from_tf()
  process_index, process_count = _process_args(process_index, process_count)
  local = _local_batch_size(data_config.eval_batch_size, process_count, 'eval_batch_size')
  ds, num_rows = _examples(
      data_config,
      yaml_path=yaml_path or data_config.eval_yaml,
      tfds_split=tfds_split or data_config.tfds_eval_split,
      train=False,
      seed=0,
      process_index=process_index,
      process_count=process_count,
      shuffle=False,
      bad_rows=bad_rows,
  )
  ds = ds.map(_drop_bad_rows)
  largest = max(
      end - start
      for start, end in (host_range(num_rows, p, process_count) for p in range(process_count))
  )
  num_batches = -(-largest // local)
  # Endless mask-0 padding, cut at the same length on every host (bad rows
  # that were dropped are replaced by padding too).
  padding = tf.data.Dataset.from_tensors(
      jax.tree.map(
          lambda x: np.stack([x] * local), examples.empty_example(examples.Layout.of(data_config))
      )
  ).repeat()
  ds = ds.concatenate(padding).rebatch(local, drop_remainder=True)
  ds = ds.take(num_batches)
  if _dtype(data_config) != tf.float32:
    ds = ds.map(
        functools.partial(_cast_images, dtype=_dtype(data_config)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
  ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
  return ds.prefetch(data_config.prefetch)


def to_global_batch(batch, sharding):
  """Host-local numpy batch -> global jax.Arrays laid out by `sharding`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def numpy_batches(dataset, bad_rows=None):
  """The dataset's batches as NumPy; raises TooManyBadRowsError past the bad-row limit.

  Every batch is checked, so the error comes as soon as the limit is crossed,
  and tf.data (its threads included) is stopped before it is raised.
  """
  iterator = dataset.as_numpy_iterator()
  while bad_rows is None or not bad_rows.exceeded:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except tf.errors.InvalidArgumentError:  # the assertion in `_assert_not_stopped`
      if bad_rows is None or not bad_rows.exceeded:
        raise
      break
    if bad_rows is not None and bad_rows.exceeded:
      break  # prepared while the limit was crossed: it may be all bad rows
    yield batch
  del iterator
  if bad_rows is not None:
    bad_rows.check()


def global_batches(dataset, sharding, ahead=0, bad_rows=None):
  """Iterates a host-local tf.data.Dataset as global batches.

  ahead > 0: a background thread fetches and transfers up to `ahead` batches
  before they are asked for (`prefetch.BackgroundIterator`; call its `close()`).
  bad_rows: the dataset's BadRows; past its limit the iterator raises
  TooManyBadRowsError (in the caller's thread).
  """
  batches = (to_global_batch(b, sharding) for b in numpy_batches(dataset, bad_rows))
  return prefetch.BackgroundIterator(batches, ahead) if ahead > 0 else batches
