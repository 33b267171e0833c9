r"""Runs a trained model on image files: meshes, joints, overlays, attention maps.

  python -m coarsemetro_jax.infer --config=configs/r50.py --checkpoint=runs/r50 \
      --images photo.jpg --bbox=120,40,200,380 --output_dir=out
  python -m coarsemetro_jax.infer --config=configs/tiny.py --checkpoint=runs/tiny \
      --images 'data/*.png' more_images/ --bboxes=boxes.json --attention
  python -m coarsemetro_jax.infer --hand --config=configs/hand_embedded.py \
      --checkpoint=runs/hand_embedded --images hand.jpg --output_dir=out

`--images` takes files, folders (their image files) and globs; paths after it
(without a flag) are images too. Each image is cropped to a square around its
box (`--bbox x,y,w,h`, once for all images or once per image, or `--bboxes`
JSON {"name or path": [x, y, w, h]}), enlarged by `--bbox_padding`; without a
box the whole image is the crop (padded to a square), with a warning when its
aspect ratio suggests the person does not fill it. Crops go through the model
in batches of `--batch_size` (the last one zero-padded, so it compiles once).

Per image, in --output_dir: <name>.obj and <name>.ply (the 6890-vertex mesh in
the camera frame: x right, y down, z forward, metres, centred at the pelvis
when the config's body model is available),
<name>.json (camera, 14 joints in 3D, in the crop and in image pixels; with
the SMPL-parameter head also the SMPL pose as axis-angle and rotation
matrices, and the betas),
<name>.png (crop | mesh overlay | side view) and, with --attention,
<name>_attention.png. An image that cannot be used is reported and skipped.

A hand config (config.model.hand; `--hand` checks the config is one) writes
the hand instead: the 778-vertex mesh with the faces of the config's hand
model, centred at the wrist of the 21 joints regressed from it (MANO's 16
plus the 5 fingertips, FreiHAND's order), and those 21 joints in the JSON.
The crop is the box as for a body (a hand box, or an image the hand fills).
"""

import dataclasses
import json
import os
import sys

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from coarsemetro_jax import attention_maps
from coarsemetro_jax import build as build_lib
from coarsemetro_jax import checkpoints
from coarsemetro_jax import hand_steps
from coarsemetro_jax import image_crops
from coarsemetro_jax import image_ops
from coarsemetro_jax import infer_outputs
from coarsemetro_jax import joints as joint_tables
from coarsemetro_jax import steps
from coarsemetro_jax.convert import orbax_variables

# config.model fields that do not change the weights (left out of mismatch hints).
RUNTIME_MODEL_FIELDS = (
    'dropout',
    'compute_dtype',
    'backbone_remat',
    'joint_mask_ratio',
    'joint_mask_value',
)


# ----------------------------------------------------------------------------
# Model.


def abstract_variables(model, image_size):
  """jax.eval_shape of the model's variables (no memory, no compute)."""
  return jax.eval_shape(
      lambda: model.init(
          {'params': jax.random.key(0)}, jnp.zeros((1, image_size, image_size, 3)), train=False
      )
  )


def load_variables(config, model, checkpoint):
  """Variables from any checkpoint kind; a clear error for another config's."""
  abstract = abstract_variables(model, config.data.image_size)
  try:
    return checkpoints.load_variables(checkpoint, abstract)
  except checkpoints.CorruptCheckpointError:
    raise  # its own message; not a question of the config
  except checkpoints.CheckpointError as e:
    if not os.path.exists(checkpoint):
      raise
    model_cfg = config.model
    saved = checkpoint_model_config(checkpoint)
    diff = [
        f'{k}: checkpoint {saved.get(k)!r}, --config {v!r}'
        for k, v in json.loads(model_cfg.to_json()).items()
        if k in saved and saved[k] != v and k not in RUNTIME_MODEL_FIELDS
    ]
    hint = (
        '\nThe checkpoint was made with another config.model:\n  ' + '\n  '.join(diff)
        if diff
        else ''
    )
    raise checkpoints.CheckpointError(
        f'{e}\nThe checkpoint does not fit the --config model ({model_cfg.name}, backbone '
        f'{model_cfg.backbone}); was it trained or converted with another config?{hint}'
    ) from e


def checkpoint_model_config(path):
  """config.model stored with a checkpoint (training meta or conversion), or {}."""
  try:
    directory = checkpoints.resolve(path)
  except checkpoints.CheckpointError:
    return {}
  candidates = [
      (
          os.path.join(os.path.dirname(directory), checkpoints.META_ITEM, 'metadata'),
          lambda d: d['model'],
      ),
      (
          os.path.join(directory, '_CHECKPOINT_METADATA'),
          lambda d: d['custom_metadata'][orbax_variables.METADATA_KEY]['model'],
      ),
  ]
  for file, get in candidates:
    try:
      with open(file) as f:
        return dict(get(json.load(f)))
    except (OSError, ValueError, KeyError, TypeError):
      continue
  return {}


def load_h36m_regressor(config):
  """The [17, 6890] H36M regressor of config.body_model, or None (with a warning)."""
  try:
    from coarsemetro_jax import body_model

    body = body_model.load_body_model(config.body_model.path, config.body_model.h36m_regressor)
  except (ImportError, OSError, ValueError) as e:
    logging.warning(
        'no body model (%s): meshes are not pelvis-centred and the joints ' 'are the joint tokens',
        e,
    )
    return None
  return np.asarray(body.h36m_regressor, np.float32)


def make_predict_fn(model, h36m_regressor=None, attention=None, hand=None):
  """`predict(variables, images [B, S, S, 3]) -> dict`, ready for jax.jit.

  With a hand model (`hand`, a hand network's), `hand_steps.predictions`
  instead: the 778 mesh and its 21 joints centred at that wrist.

  `steps.predictions` of the model outputs, the same as the eval's: with the
  H36M regressor [17, V], the mesh is centred at its regressed pelvis (as
  FastMETRO's demo) and the joints are the mesh's J14; without it, the raw
  mesh and the joint tokens. Returns pred_cam [B, 3], pred_vertices
  [B, 6890, 3], pred_3d_joints [B, 14, 3], pred_2d_joints [B, 14, 2]
  (normalised crop) and, with an AttentionSpec, 'attention'.
  """
  regress = None
  if h36m_regressor is not None:
    regressor = np.asarray(h36m_regressor, np.float32)  # [17, V]
    regress = lambda vertices: jnp.einsum(  # [B, 17, 3]
        'jv,bvc->bjc', regressor, vertices, precision=jax.lax.Precision.HIGHEST
    )

  def predict(variables, images):
    if attention is None:
      outputs = model.apply(variables, images, train=False)
    else:
      outputs, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    if hand is not None:
      result = hand_steps.predictions(outputs, hand)
    else:
      result = steps.predictions(outputs, regress)
    if attention is not None:
      result['attention'] = attention_maps.select(
          state['intermediates'], attention, model.num_joints
      )
    return result

  return predict


def normalize(crops):
  """uint8 [N, S, S, 3] crops -> ImageNet-normalised float32 (as the eval data)."""
  return np.stack([image_ops.color_normalize(c) for c in crops])


# ----------------------------------------------------------------------------
# Driver.


@dataclasses.dataclass
class Result:
  written: list  # output stems, in input order
  failures: list  # (path, message)


def run(
    config,
    checkpoint,
    image_specs,
    output_dir,
    *,
    bbox=(),
    bboxes_json='',
    batch_size=8,
    padding=image_crops.BBOX_PADDING,
    max_megapixels=image_crops.MAX_MEGAPIXELS,
    attention=None,
    h36m_regressor='config',
    progress=True,
    hand=None,
):
  """Inference over `image_specs`; see the module docstring. Returns Result.

  `bbox`: boxes 'x,y,w,h' (one for all images or one per image);
  `h36m_regressor`: array, None, or 'config' (from config.body_model; not
  used by a hand config); `hand`: True (--hand) requires a hand config, None
  takes the config's network as it is.
  """
  if batch_size < 1:
    raise ValueError(f'--batch_size must be >= 1, got {batch_size}')
  is_hand = build_lib.is_hand(config)
  if hand and not is_hand:
    raise ValueError(
        f'--hand needs a hand config (config.model.hand), e.g. configs/hand_r50.py; '
        f'this config builds the body network {config.model.name}'
    )
  if is_hand and attention is not None:
    raise ValueError('--attention labels the body joint tokens; it has no hand version')
  paths, problems = image_crops.collect_images(image_specs)
  failures = [(p.rsplit(': ', 1)[0], p) for p in problems]
  for problem in problems:
    logging.error('%s', problem)
  if not paths:
    raise image_crops.ImageError('no images to process: ' + '; '.join(problems or ['none given']))
  boxes = {}
  if bbox:
    parsed = [image_crops.parse_bbox(b) for b in bbox]
    if len(parsed) not in (1, len(paths)):
      raise ValueError(
          f'--bbox given {len(parsed)} times for {len(paths)} images; give it '
          'once (all images) or once per image, or use --bboxes'
      )
    boxes = {p: parsed[0 if len(parsed) == 1 else i] for i, p in enumerate(paths)}
  if bboxes_json:
    boxes.update(image_crops.read_bboxes_json(bboxes_json))
  topology, _, model = build_lib.build(config, body=False)
  variables = load_variables(config, model, checkpoint)
  size, faces = config.data.image_size, topology.faces[0]
  if is_hand:  # its faces, joint regressor and fingertips
    hand_mesh = build_lib.load_hand_model(config, topology)
    h36m_regressor, faces = None, np.asarray(hand_mesh.faces)
    predict = jax.jit(make_predict_fn(model, hand=hand_mesh))
  else:
    if isinstance(h36m_regressor, str):
      h36m_regressor = load_h36m_regressor(config)
    predict = jax.jit(make_predict_fn(model, h36m_regressor, attention))
  os.makedirs(output_dir, exist_ok=True)
  written, used, pending = [], set(), []

  def flush():
    crops = normalize([c.pixels for c in pending])  # [n, S, S, 3]
    padded = np.zeros((batch_size,) + crops.shape[1:], np.float32)
    padded[: len(crops)] = crops
    out = jax.device_get(predict(variables, padded))
    for i, crop in enumerate(pending):
      stem = infer_outputs.output_stem(crop.path, used)
      infer_outputs.write_outputs(
          output_dir,
          stem,
          crop,
          jax.tree.map(lambda x, i=i: x[i], out),
          faces,
          attention,
          centred=is_hand or h36m_regressor is not None,
          hand=is_hand,
      )
      written.append(stem)
    pending.clear()

  for k, path in enumerate(paths):
    if progress:  # one updating line on a terminal, else one line per image
      tty = sys.stderr.isatty()
      print(
          f'{chr(13) if tty else ""}[{k + 1}/{len(paths)}] {path}',
          end='' if tty else '\n',
          file=sys.stderr,
          flush=True,
      )
    try:
      image, notes = image_crops.load_image(path, max_megapixels)
      box = image_crops.box_for(path, boxes)
      pending.append(image_crops.crop_image(path, image, box, size, padding, notes))
    except image_crops.ImageError as e:
      logging.error('%s', e)
      failures.append((path, str(e)))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  if progress and sys.stderr.isatty():
    print(file=sys.stderr)
  logging.info('%d images written to %s, %d failed', len(written), output_dir, len(failures))
  return Result(written, failures)


def _parse_ints(values, name):
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f'--{name}: expected comma-separated integers, got {values}') from e


def _define_flags():
  """Command-line flags (defined only when run as a program)."""
  from absl import flags

  from coarsemetro_jax import config_files

  config_files.define_flag('config', 'Model configuration file.')
  flags.DEFINE_string(
      'checkpoint', None, 'Training workdir, step directory or converted ' 'checkpoint.'
  )
  flags.DEFINE_multi_string(
      'images', [], 'Image files, folders or globs (paths after the ' 'flags are images too).'
  )
  flags.DEFINE_string('output_dir', 'inference', 'Where the outputs go.')
  flags.DEFINE_multi_string(
      'bbox', [], 'Person box x,y,w,h in image pixels: once for all ' 'images or once per image.'
  )
  flags.DEFINE_string('bboxes', '', 'JSON {"image name or path": [x, y, w, h]}.')
  flags.DEFINE_float('bbox_padding', image_crops.BBOX_PADDING, 'Crop side / longer box side.')
  flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.')
  flags.DEFINE_float('max_megapixels', image_crops.MAX_MEGAPIXELS, 'Refuse larger images.')
  flags.DEFINE_bool('attention', False, 'Also write <name>_attention.png (Figs. 5-7).')
  flags.DEFINE_bool('hand', False, 'The config is a hand network: write hand meshes.')
  flags.DEFINE_list(
      'vertex_tokens',
      [str(i) for i in attention_maps.DEFAULT_VERTEX_TOKENS],
      'Decoder vertex tokens to show.',
  )
  flags.DEFINE_list(
      'joint_tokens',
      [str(i) for i in attention_maps.DEFAULT_JOINT_TOKENS],
      f'Decoder joint tokens to show (J14: {", ".join(joint_tables.J14_NAMES)}).',
  )
  flags.DEFINE_list('decoder_layers', ['0'], 'Decoder layers (forward order over stages).')
  flags.DEFINE_list('encoder_layers', [], 'Encoder layers for the camera map (empty = all).')
  flags.mark_flags_as_required(['config', 'checkpoint'])


def main(argv):
  from absl import flags as absl_flags

  flags = absl_flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  images = flags.images + list(argv[1:])
  if not images:
    raise SystemExit('no images: pass --images PATH... (files, folders or globs)')
  try:
    spec = None
    if flags.attention:
      ints = lambda name: tuple(_parse_ints(flags[name].value, name))
      spec = attention_maps.AttentionSpec(
          ints('vertex_tokens'),
          ints('joint_tokens'),
          ints('decoder_layers'),
          ints('encoder_layers'),
      )
    result = run(
        flags.config,
        flags.checkpoint,
        images,
        flags.output_dir,
        bbox=flags.bbox,
        bboxes_json=flags.bboxes,
        batch_size=flags.batch_size,
        padding=flags.bbox_padding,
        max_megapixels=flags.max_megapixels,
        attention=spec,
        hand=flags.hand or None,
    )
  except (ValueError, OSError) as e:  # bad flags, boxes, checkpoint: one clear line
    raise SystemExit(f'error: {e}') from e
  for _, message in result.failures:
    print(f'skipped: {message}', file=sys.stderr)
  print(
      f'{len(result.written)} images -> {flags.output_dir}'
      + (f', {len(result.failures)} skipped' if result.failures else '')
  )
  return 0 if result.written else 1


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
