r"""Serving artifacts: a serialized `jax.export` (StableHLO) of the inference function.

  python -m coarsemetro_jax.export --config=configs/r50.py --checkpoint=runs/r50 \
      --out=r50.jaxexport [--platforms=cpu,cuda] [--saved_model=r50_savedmodel]

The artifact is self-contained: the weights are constants of the program, and
the batch dimension is symbolic, so one file serves any batch size. Input:
float32 [B, S, S, 3] ImageNet-normalised RGB crops (`infer.normalize`); output:
the dict of `infer.make_predict_fn` (pred_cam, pred_vertices, pred_3d_joints,
pred_2d_joints). Run it with `load(path)(images)`; only jax is needed, no Flax,
no config and no checkpoint. `--saved_model` also writes a TF SavedModel via
jax2tf (TensorFlow is imported only then).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import build
from coarsemetro_jax import infer

BATCH = 'b'  # name of the symbolic batch dimension


def inference_fn(model, variables, h36m_regressor=None):
  """images [B, S, S, 3] -> outputs, with `variables` closed over."""
  predict = infer.make_predict_fn(model, h36m_regressor)
  return lambda images: predict(variables, images)


def input_spec(image_size):
  """Batch-polymorphic float32 [b, S, S, 3]."""
  shape = jax.export.symbolic_shape(f'{BATCH}, {image_size}, {image_size}, 3')
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def export_inference(model, variables, image_size, h36m_regressor=None, platforms=None):
  """`jax.export.Exported` of the inference function for `platforms`.

  `platforms`: e.g. ('cpu', 'cuda'); None = the default backend only.
  """
  fn = jax.jit(inference_fn(model, variables, h36m_regressor))
  return jax.export.export(fn, platforms=platforms)(input_spec(image_size))


def save(path, exported):
  """Writes the serialized artifact (bytes) to `path`."""
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return path


def load(path):
  """The function stored at `path`: images [B, S, S, 3] float32 -> outputs dict."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # flatbuffer errors vary
    raise ValueError(f'{path}: not a serialized jax.export artifact ({e})') from e
  spec = exported.in_avals[0]

  def call(images):
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[1:] != spec.shape[1:]:
      raise ValueError(
          f'{path}: expected images [B, {", ".join(map(str, spec.shape[1:]))}]'
          f', got {list(images.shape)}'
      )
    return exported.call(images)

  call.exported = exported
  return call


def save_tf_saved_model(directory, model, variables, image_size, h36m_regressor=None):
  """TF SavedModel of the same function via jax2tf (weights as tf.Variables)."""
  # TensorFlow only here: the serving export is optional, the core stays TF-free.
  from jax.experimental import jax2tf
  import tensorflow as tf

  predict = infer.make_predict_fn(model, h36m_regressor)
  params = jax.tree.map(lambda x: tf.Variable(np.asarray(x), trainable=False), variables)
  converted = jax2tf.convert(
      predict,
      polymorphic_shapes=[None, f'({BATCH}, {image_size}, {image_size}, 3)'],
      with_gradient=False,
  )
  module = tf.Module()
  module.params = tf.nest.flatten(params)
  module.serve = tf.function(
      lambda images: converted(params, images),
      autograph=False,
      input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
  )
  tf.saved_model.save(module, directory)
  return directory


def main(argv):
  from absl import flags
  from absl import logging

  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  cfg = flags.FLAGS
  config = cfg.config
  try:
    model = build.build(config, body=False).model
    variables = infer.load_variables(config, model, cfg.checkpoint)
  except (ValueError, OSError) as e:
    raise SystemExit(f'error: {e}') from e
  regressor = infer.load_h36m_regressor(config)
  platforms = tuple(cfg.platforms) or None
  exported = export_inference(model, variables, config.data.image_size, regressor, platforms)
  save(cfg.out, exported)
  print(
      f'{cfg.out}: {os.path.getsize(cfg.out) / 2**20:.1f} MiB, platforms '
      f'{exported.platforms}, input {exported.in_avals[0]}'
  )
  if cfg.saved_model:
    save_tf_saved_model(cfg.saved_model, model, variables, config.data.image_size, regressor)
    print(f'{cfg.saved_model}: TF SavedModel (signature serve)')


if __name__ == '__main__':
  from absl import app
  from absl import flags

  from coarsemetro_jax import config_files

  config_files.define_flag('config', 'Model configuration file.')
  flags.DEFINE_string(
      'checkpoint', None, 'Training workdir, step directory or converted ' 'checkpoint.'
  )
  flags.DEFINE_string('out', None, 'Output file for the serialized artifact.')
  flags.DEFINE_list(
      'platforms', [], 'Lowering platforms, e.g. cpu,cuda (default: this ' "machine's backend)."
  )
  flags.DEFINE_string('saved_model', '', 'Also write a TF SavedModel here (jax2tf).')
  flags.mark_flags_as_required(['config', 'checkpoint', 'out'])
  app.run(main)
